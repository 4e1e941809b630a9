import { afterEach, describe, expect, it } from 'vitest';
import { rawPeer } from '../helpers/raw-peer.js';
import { InvalidInputError } from '../../src/errors.js';
import {
  Envelope,
  PeerGoneError,
  PROTOCOL_VERSION,
  RemoteError,
  validateEnvelope,
  WireConnection,
  WireProtocolError,
  WireServer,
  type EnvelopeMessage,
  type ProgressMessage,
} from '../../src/wire/index.js';

let server: WireServer | undefined;
afterEach(async () => {
  await server?.close();
  server = undefined;
});

async function start(options: Partial<Parameters<typeof WireServer.listen>[0]> = {}): Promise<string> {
  server = await WireServer.listen({
    host: '127.0.0.1',
    port: 0,
    name: 'test-agent',
    softwareVersion: '0',
    onRequest: (e, connection) => {
      if (e.listWorkloads) {
        connection.progress({ migrationId: 'm-1', phase: 'preflight', message: 'working' });
        return Promise.resolve({ workloadList: { workloads: [{ name: 'w', pid: 7 }] } });
      }
      if (e.commit) return Promise.reject(new InvalidInputError('nothing to commit', { hint: 'migrate first' }));
      return Promise.resolve({ ack: {} });
    },
    ...options,
  });
  return `ws://127.0.0.1:${server.port}`;
}

const hello = { role: 'controller' as const, name: 'test', softwareVersion: '0' };

function helloFrame(version = PROTOCOL_VERSION): Uint8Array {
  return Envelope.encode({ id: 1, hello: { protocolVersion: version, role: 1, name: 'raw' } }).finish();
}

describe('wire connection', () => {
  it('answers requests, carries failures with their code and hint, and delivers progress while working', async () => {
    const url = await start();
    const progress: ProgressMessage[] = [];
    const c = await WireConnection.connect(url, hello, { onProgress: (p) => progress.push(p) });
    expect(c.peerName).toBe('test-agent');
    const list = await c.request({ listWorkloads: {} }, 'workloadList');
    expect(list.workloads?.[0]).toMatchObject({ name: 'w', pid: 7 });
    expect(progress.map((p) => p.message)).toEqual(['working']);
    const error = (await c
      .request({ commit: { migrationId: 'm-1' } }, 'committed')
      .catch((e: unknown) => e)) as RemoteError;
    expect(error).toBeInstanceOf(RemoteError);
    expect(error.code).toBe('INVALID_INPUT');
    expect(error.message).toBe('test-agent: nothing to commit');
    expect(error.hint).toBe('migrate first');
    c.close();
  });

  it('refuses a peer of another protocol version', async () => {
    const url = await start();
    const { ws, frames, closed } = await rawPeer(url);
    ws.send(helloFrame(PROTOCOL_VERSION + 1));
    expect(await closed).toBe(1000);
    expect(frames[0]?.failure?.message).toMatch(/protocol 2 is not spoken here/);
  });

  it('answers anything before hello with a failure and stops trusting the connection', async () => {
    const url = await start();
    const { ws, frames, closed } = await rawPeer(url);
    ws.send(Envelope.encode({ id: 1, listWorkloads: {} }).finish());
    await closed;
    expect(frames[0]?.failure?.code).toBe('WIRE_PROTOCOL');
    expect(frames[0]?.failure?.message).toBe('the first message must be hello');
  });

  it('closes on a frame that does not decode, and keeps serving others', async () => {
    const url = await start();
    const { ws, frames, closed } = await rawPeer(url);
    ws.send(helloFrame());
    ws.send(Buffer.from([0x0a, 0xff, 0xff, 0xff]));
    expect(await closed).toBe(1008);
    expect(frames.some((f) => f.failure?.code === 'WIRE_PROTOCOL')).toBe(true);
    const c = await WireConnection.connect(url, hello);
    await expect(c.request({ listWorkloads: {} }, 'workloadList')).resolves.toBeDefined();
    c.close();
  });

  it('closes on an answer that carries a request (found by the fuzz test: the peer waited), and ignores a stray ack', async () => {
    const url = await start();
    const { ws, frames, closed } = await rawPeer(url);
    ws.send(helloFrame());
    ws.send(Envelope.encode({ replyTo: 35, ack: {} }).finish()); // a late answer: dropped
    ws.send(Envelope.encode({ replyTo: 34, statusQuery: {} }).finish());
    expect(await closed).toBe(1008);
    expect(frames.some((f) => f.failure?.message?.includes('an answer cannot carry statusQuery'))).toBe(true);
  });

  it('closes on text frames and on an image name that leaves its directory', async () => {
    const url = await start();
    const text = await rawPeer(url);
    text.ws.send(helloFrame());
    text.ws.send('hello?');
    expect(await text.closed).toBe(1008);

    const traversal = await rawPeer(url);
    traversal.ws.send(helloFrame());
    traversal.ws.send(
      Envelope.encode({
        id: 2,
        imageChunk: { migrationId: 'm-1', round: 'final', name: '../../etc/passwd', offset: 0 },
      }).finish(),
    );
    expect(await traversal.closed).toBe(1008);
    expect(traversal.frames.at(-1)?.failure?.message).toMatch(/bad image file name/);
  });

  it('refuses frames larger than the limit', async () => {
    const url = await start();
    const { ws, closed } = await rawPeer(url);
    ws.send(helloFrame());
    ws.send(Buffer.alloc(3 * 1024 * 1024));
    expect(await closed).toBe(1009);
  });

  it('notices a peer that stopped answering heartbeats, and closes', async () => {
    const url = await start({ heartbeatMs: 100, deadAfterMs: 400 });
    const { ws, closed } = await rawPeer(url, { autoPong: false });
    ws.send(helloFrame());
    const started = Date.now();
    await closed;
    expect(Date.now() - started).toBeLessThan(2_000);
  });

  it('fails pending requests when the peer goes away', async () => {
    const url = await start({ onRequest: () => new Promise(() => undefined) });
    const c = await WireConnection.connect(url, hello);
    const pending = c.request({ listWorkloads: {} }, 'workloadList', { timeoutMs: 0 });
    await server?.close();
    server = undefined;
    await expect(pending).rejects.toBeInstanceOf(PeerGoneError);
  });
});

describe('message validation', () => {
  const ok: EnvelopeMessage = {
    id: 1,
    imageChunk: { migrationId: 'm-1', round: 'final', name: 'core-1.img', offset: 0 },
  };

  it('accepts a well-formed message', () => {
    expect(() => validateEnvelope(ok)).not.toThrow();
  });

  it.each([
    ['no body', { id: 1 }],
    ['two bodies', { id: 1, ack: {}, listWorkloads: {} }],
    ['a migration id that names a path', { id: 1, commit: { migrationId: '../x' } }],
    ['an absolute image name', { id: 1, imageChunk: { ...ok.imageChunk, name: '/etc/shadow' } }],
    ['a round that is a path', { id: 1, restore: { migrationId: 'm-1', round: '../..' } }],
    ['a huge string', { id: 1, abort: { migrationId: 'm-1', reason: 'x'.repeat(5000) } }],
    ['a PID out of range', { id: 1, finalDump: { migrationId: 'm-1', round: 'final', pid: -5 } }],
    ['an unknown role', { id: 1, hello: { protocolVersion: 1, role: 7 } }],
    ['a workload without a command', { id: 1, runWorkload: { name: 'w', argv: [] } }],
    ['too many arguments', { id: 1, runWorkload: { name: 'w', argv: Array.from({ length: 300 }, () => 'a') } }],
  ] as [string, EnvelopeMessage][])('refuses %s', (_, envelope) => {
    expect(() => validateEnvelope(envelope)).toThrow(WireProtocolError);
  });
});
