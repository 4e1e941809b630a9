import { describe, expect, it } from 'vitest';
import {
  Envelope,
  HOLD_MS,
  MAX_PID,
  validateEnvelope,
  WireProtocolError,
  type EnvelopeMessage,
} from '../../src/wire/index.js';

/** What the receiving end sees: the message as encoded and decoded, so 64-bit fields arrive as protobufjs makes them. */
function arrived(envelope: EnvelopeMessage): EnvelopeMessage {
  return Envelope.decode(Envelope.encode(envelope).finish());
}

function refusal(envelope: EnvelopeMessage): string {
  try {
    validateEnvelope(arrived(envelope));
  } catch (error) {
    expect(error).toBeInstanceOf(WireProtocolError);
    return (error as Error).message;
  }
  throw new Error(`accepted ${JSON.stringify(envelope)}`);
}

const migrationId = 'm-1';
const sha256 = 'a'.repeat(64);
const finalDump = {
  migrationId,
  round: 'final',
  pid: 1234,
  pageServerAddress: '10.199.20.2',
  pageServerPort: 40123,
  destinationUrl: 'wss://10.199.20.2:7070',
  holdMs: 60_000,
};
const prepare = {
  migrationId,
  sourceUrl: 'wss://10.199.20.1:7070',
  holdMs: 60_000,
  workload: { name: 'counter', argv: ['/bin/counter', 'x'], logFile: '/var/lib/ferry/workloads/counter.log' },
};

describe('what a migration sends passes validation', () => {
  it.each([
    ['hello', { id: 1, hello: { protocolVersion: 1, role: 1, name: 'controller', softwareVersion: '0.1.0' } }],
    ['welcome', { replyTo: 1, welcome: { protocolVersion: 1, agentName: 'node-7.example', softwareVersion: '0.1.0' } }],
    ['prepare', { id: 2, prepareDestination: prepare }],
    ['prepare on an IPv6 host', { id: 2, prepareDestination: { ...prepare, sourceUrl: 'wss://[fd00::1]:7070' } }],
    ['prepare with the default hold', { id: 2, prepareDestination: { ...prepare, holdMs: 0 } }],
    ['a page server', { replyTo: 3, pageServerStarted: { address: '10.199.20.2', port: 40123 } }],
    ['a pre-dump round', { id: 4, preDumpRound: { ...finalDump, round: '1', destinationUrl: undefined } }],
    ['the final dump', { id: 5, finalDump: { ...finalDump, parent: '3' } }],
    ['a chunk', { id: 6, imageChunk: { migrationId, round: 'final', name: 'core-1.img', offset: 2 ** 40 } }],
    ['a manifest', { id: 7, imagesDone: { migrationId, round: 'final', files: [{ name: 'a.img', size: 9, sha256 }] } }],
    ['a restore', { id: 8, restore: { migrationId, round: 'final', holdMs: HOLD_MS.max } }],
    ['restored', { replyTo: 8, restored: { pid: MAX_PID, restoreMs: 20 } }],
    ['a workload', { id: 9, runWorkload: { name: 'w', argv: ['sh', '-c', 'echo "$1"', ''] } }],
  ] as [string, EnvelopeMessage][])('%s', (_, envelope) => {
    expect(() => validateEnvelope(arrived(envelope))).not.toThrow();
  });
});

describe('an agent refuses', () => {
  it('a source URL that is not ws(s)://HOST:PORT, so a lease never connects anywhere else', () => {
    for (const sourceUrl of [
      '',
      'file:///etc/passwd',
      'http://10.0.0.1:7070',
      'wss://10.0.0.1',
      'wss://10.0.0.1:7070/x',
      'wss://user@10.0.0.1:7070',
      'wss://10.0.0.1:7070?x=1',
      'not a url',
    ]) {
      expect(refusal({ id: 1, prepareDestination: { ...prepare, sourceUrl } })).toMatch(/source URL is not ws\(s\)/);
    }
  });

  it('a destination URL the source would stream its images to that is not an agent URL', () => {
    expect(refusal({ id: 1, finalDump: { ...finalDump, destinationUrl: 'file:///dev/shm/x' } })).toMatch(
      /destination URL is not ws\(s\)/,
    );
  });

  it('a hold under a second, which would have an expired lease ask the source again in a tight loop', () => {
    expect(refusal({ id: 1, prepareDestination: { ...prepare, holdMs: 1 } })).toMatch(/hold out of range: 1 ms/);
    expect(refusal({ id: 1, finalDump: { ...finalDump, holdMs: 999 } })).toMatch(/hold out of range/);
  });

  it('a post-copy restore whose lazy page server is not an IP literal (it becomes criu lazy-pages --address) or port', () => {
    const restore = { migrationId, round: 'final', holdMs: 60_000, postcopyPort: 4000 };
    expect(refusal({ id: 1, restore: { ...restore, postcopyAddress: '--tls-key=/etc/shadow' } })).toMatch(
      /lazy page server address is not an IP address/,
    );
    expect(refusal({ id: 1, restore: { ...restore, postcopyAddress: '10.0.0.1', postcopyPort: 70_000 } })).toMatch(
      /lazy page server port out of range/,
    );
    expect(refusal({ replyTo: 1, dumpHeld: { postcopyPort: 65_536 } })).toMatch(/lazy page server port out of range/);
    // A post-copy final dump names no page server (the source serves its own memory).
    const lazyDump = { ...finalDump, pageServerAddress: '', pageServerPort: 0, postcopy: true };
    expect(() => validateEnvelope(arrived({ id: 1, finalDump: lazyDump }))).not.toThrow();
  });

  it('a hold over a day, past which a timer fires at once instead', () => {
    expect(refusal({ id: 1, restore: { migrationId, round: 'final', holdMs: 2 ** 31 } })).toMatch(/hold out of range/);
  });

  it('a page server address that is not an IP literal, and ports 0 and above 65535', () => {
    expect(refusal({ id: 1, finalDump: { ...finalDump, pageServerAddress: 'localhost' } })).toMatch(
      /page server address is not an IP address/,
    );
    expect(refusal({ id: 1, preDumpRound: { ...finalDump, pageServerPort: 0 } })).toMatch(/port out of range: 0/);
    expect(refusal({ id: 1, preDumpRound: { ...finalDump, pageServerPort: 65536 } })).toMatch(/port out of range/);
    expect(refusal({ replyTo: 1, pageServerStarted: { address: '10.0.0.1', port: 0 } })).toMatch(/port out of range/);
  });

  it('an image offset or size that a double cannot hold exactly, and a negative size', () => {
    const chunk = { migrationId, round: 'final', name: 'core-1.img' };
    expect(refusal({ id: 1, imageChunk: { ...chunk, offset: 2 ** 60 } })).toMatch(/image offset out of range/);
    const file = { name: 'core-1.img', sha256 };
    expect(
      refusal({ id: 1, imagesDone: { migrationId, round: 'final', files: [{ ...file, size: 2 ** 60 }] } }),
    ).toMatch(/image size out of range/);
    expect(refusal({ id: 1, imagesDone: { migrationId, round: 'final', files: [{ ...file, size: -5 }] } })).toMatch(
      /image size out of range/,
    );
  });

  it('PIDs Linux never hands out: 0 where a process is meant, PID_MAX_LIMIT, and a negative one', () => {
    expect(refusal({ id: 1, finalDump: { ...finalDump, pid: 0 } })).toMatch(/PID out of range: 0/);
    expect(refusal({ id: 1, finalDump: { ...finalDump, pid: MAX_PID + 1 } })).toMatch(/PID out of range: 4194304/);
    expect(refusal({ id: 1, factsQuery: { pid: -1 } })).toMatch(/PID out of range: -1/);
    expect(refusal({ replyTo: 1, restored: { pid: 0 } })).toMatch(/PID out of range/);
    expect(refusal({ replyTo: 1, facts: { takenPids: [5, -2] } })).toMatch(/PID out of range: -2/);
  });

  it('a workload command that execve would cut short or could not run', () => {
    expect(refusal({ id: 1, runWorkload: { name: 'w', argv: ['/bin/sh\0-c', 'x'] } })).toMatch(/NUL/);
    expect(refusal({ id: 1, runWorkload: { name: 'w', argv: ['', 'x'] } })).toMatch(/needs a command/);
    const workload = { ...prepare.workload, argv: [] };
    expect(refusal({ id: 1, prepareDestination: { ...prepare, workload } })).toMatch(/needs a command/);
    const logFile = '/var/lib/ferry/workloads/w.log\0/etc/passwd';
    expect(refusal({ id: 1, prepareDestination: { ...prepare, workload: { ...prepare.workload, logFile } } })).toMatch(
      /log path holds a NUL/,
    );
  });

  it('a peer name that is a path or carries control characters, and a long software version', () => {
    const hello = { protocolVersion: 1, role: 1 };
    expect(refusal({ id: 1, hello: { ...hello, name: '../../etc' } })).toMatch(/bad peer name/);
    expect(refusal({ id: 1, hello: { ...hello, name: 'a\nforged line' } })).toMatch(/bad peer name/);
    expect(refusal({ id: 1, hello: { ...hello, name: 'x', softwareVersion: 'v'.repeat(65) } })).toMatch(
      /bad software version/,
    );
    expect(refusal({ replyTo: 1, welcome: { protocolVersion: 1, agentName: 'a\u001b[2J' } })).toMatch(/bad agent name/);
  });

  it('a progress event that carries a request id, which would wait for an answer no one sends (found by the fuzz test)', () => {
    expect(refusal({ id: 27, progress: { migrationId, message: 'x' } })).toMatch(/a progress event cannot ask/);
    expect(() => validateEnvelope(arrived({ progress: { migrationId, message: 'x' } }))).not.toThrow();
  });

  it('an envelope with two bodies, even when both are valid alone', () => {
    const bytes = Buffer.concat([
      Envelope.encode({ id: 1, listWorkloads: {} }).finish(),
      Envelope.encode({ statusQuery: {} }).finish(),
    ]);
    expect(() => validateEnvelope(Envelope.decode(bytes))).toThrow(/exactly one known body/);
  });

  it('an unknown enum value for the role', () => {
    const hostile = { id: 1, hello: { protocolVersion: 1, role: -1, name: 'x' } } as unknown as EnvelopeMessage;
    expect(refusal(hostile)).toMatch(/unknown role/);
  });
});
