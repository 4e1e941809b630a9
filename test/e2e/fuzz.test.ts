import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { hostEndpoint } from '../../controller/agents.js';
import { labDown, labUp, type Lab, type LabHost } from '../../controller/lab.js';
import { migrate } from '../../controller/migration.js';
import { listWorkloads, runWorkload } from '../../controller/workloads.js';
import { projectRoot } from '../../src/paths.js';
import { loadIdentity, type Identity } from '../../src/tls/index.js';
import { Envelope, MAX_FRAME_BYTES, type Body, type EnvelopeMessage } from '../../src/wire/index.js';
import { requireRoot } from '../helpers/root.js';

/**
 * A live agent (lab host a, mutual TLS) gets at least 100,000 random and
 * mutated messages: it must not crash, hang, grow without bound or write
 * outside its directories, and a real migration must work right after.
 * FERRY_FUZZ_SEED=N replays a run; FERRY_FUZZ_MESSAGES=N changes the count.
 */

const LAB = 'fuzz';
const TOTAL = Number(process.env.FERRY_FUZZ_MESSAGES ?? 100_000);
const SEED = Number(process.env.FERRY_FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));
/** One message in this many is protocol garbage, sent on a connection of its own (the agent closes it). */
const GARBAGE_EVERY = 30;
const BATCH = 400;

let lab: Lab;
let a: LabHost;
let identity: Identity;
const scratch = mkdtempSync(join(tmpdir(), 'ferry-fuzz-'));
const canary = join(scratch, 'canary');
let pidMax = 32768;

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB });
  a = lab.hosts[0] as LabHost;
  identity = loadIdentity(lab.controllerTls ?? '');
  pidMax = Number(readFileSync('/proc/sys/kernel/pid_max', 'utf8'));
}, 120_000);

afterAll(async () => {
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

/** mulberry32: small, seedable, good enough to pick mutations. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const random = prng(SEED);
const int = (n: number): number => Math.floor(random() * n);
const pick = <T>(items: readonly T[]): T => items[int(items.length)] as T;
const bytes = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => int(256)));
const word = (alphabet: string, min: number, max: number): string =>
  Array.from({ length: min + int(max - min + 1) }, () => alphabet.charAt(int(alphabet.length))).join('');
const id = (): string =>
  pick([...'abcdefghijklmnopqrstuvwxyz0123456789']) + word('abcdefghijklmnopqrstuvwxyz0123456789-', 0, 40);
const round = (): string => (random() < 0.2 ? 'final' : String(1 + int(999)));
const imageName = (): string => pick([...'ABCabc019']) + word('abcdefghijklmnopqrstuvwxyz0123456789._-', 0, 60);
/** A PID above pid_max: valid on the wire, never a process here (the agent must refuse, not dump anything). */
const absentPid = (): number => pidMax + 1 + int(4_194_304 - pidMax - 1);

/** A well-formed request with hostile content: it passes validation, so the agent must answer it and stay up. */
function wellFormed(): Body {
  switch (int(16)) {
    case 0:
      return { commit: { migrationId: id() } };
    case 1:
      return { resume: { migrationId: id() } };
    case 2:
      return { abort: { migrationId: id(), reason: word('xyz \n\t"\\', 0, 300) } };
    case 3:
      return { outcomeQuery: { migrationId: id() } };
    case 4:
      return { restore: { migrationId: id(), round: round(), holdMs: int(120_000) } };
    case 5:
      return {
        imageChunk: { migrationId: id(), round: round(), name: imageName(), offset: int(1e9), data: bytes(int(4096)) },
      };
    case 6:
      return {
        imagesDone: {
          migrationId: id(),
          round: round(),
          files: Array.from({ length: int(20) }, () => ({
            name: imageName(),
            size: int(1e9),
            sha256: bytes(32).toString('hex'),
          })),
        },
      };
    case 7:
      return { pageServerStart: { migrationId: id(), round: round(), parent: random() < 0.5 ? '' : round() } };
    case 8:
    case 9: {
      const body = {
        migrationId: id(),
        round: round(),
        parent: '',
        pid: absentPid(),
        pageServerAddress: pick(['127.0.0.1', '10.0.0.1', '::1', 'not-an-ip', '']),
        pageServerPort: int(65536),
      };
      return random() < 0.5
        ? { preDumpRound: body }
        : { finalDump: { ...body, destinationUrl: 'wss://127.0.0.1:1', holdMs: int(1000) } };
    }
    case 10:
      return { listWorkloads: {} };
    case 11:
      return { statusQuery: {} };
    case 12:
      return { nodeQuery: {} };
    case 13:
      // Answers sent as if they were requests: the agent must refuse them, not act on them.
      return pick<Body>([{ ack: {} }, { welcome: { protocolVersion: 1 } }, { resumed: { pid: 1 } }, { committed: {} }]);
    case 14:
      return { workload: { name: 'x', pid: absentPid(), argv: ['/bin/true'] } };
    default:
      return {
        imageChunk: {
          migrationId: id(),
          round: round(),
          name: imageName(),
          offset: 0,
          data: bytes(1 + int(64 * 1024)),
        },
      };
  }
}

/** Protocol garbage and hostile names: the agent must refuse each and close that connection, nothing more. */
function garbage(): { data: Buffer | string; binary: boolean } {
  const encode = (m: EnvelopeMessage): Buffer => Buffer.from(Envelope.encode(m).finish());
  const valid = (): Buffer => encode({ ...wellFormed(), id: 1 + int(1000) });
  switch (int(10)) {
    case 0:
      return { data: bytes(int(512)), binary: true };
    case 1: {
      const b = valid();
      for (let i = 0; i < 1 + int(8) && b.length > 0; i++) {
        const at = int(b.length);
        b[at] = (b[at] ?? 0) ^ (1 << int(8));
      }
      return { data: b, binary: true };
    }
    case 2: {
      const b = valid();
      return { data: b.subarray(0, int(b.length)), binary: true };
    }
    case 3:
      return { data: word('{}[]"abc:, ', 1, 200), binary: false };
    case 4:
      return {
        data: encode({
          id: 1,
          imageChunk: {
            migrationId: id(),
            round: round(),
            name: pick([`../../${canary}`, canary, '../x', 'a/b', 'a\0b', '', '.', '..', `/proc/self/${imageName()}`]),
            offset: 0,
            data: Buffer.from('owned'),
          },
        }),
        binary: true,
      };
    case 5:
      return {
        data: encode({
          id: 1,
          prepareDestination: { migrationId: pick(['../../tmp', '/etc', 'A B', '', '..']), holdMs: 1 },
        }),
        binary: true,
      };
    case 6:
      return { data: encode({ id: 1, replyTo: 2, ack: {} }), binary: true };
    case 7:
      return {
        data: encode({ id: 1, factsQuery: { pid: -1 - int(1000), workload: '../../etc/passwd' } }),
        binary: true,
      };
    case 8:
      return { data: encode({ id: 1, hello: { protocolVersion: 1, role: 7 + int(100), name: 'x' } }), binary: true };
    default:
      return {
        data: encode({
          id: 1,
          imagesDone: { migrationId: id(), round: round(), files: [{ name: canary, size: 1, sha256: 'x' }] },
        }),
        binary: true,
      };
  }
}

function open(): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(a.url, {
      ca: identity.ca,
      cert: identity.cert,
      key: identity.key,
      maxPayload: MAX_FRAME_BYTES,
    });
    ws.binaryType = 'nodebuffer';
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

const hello = (): Buffer =>
  Buffer.from(
    Envelope.encode({ id: 1, hello: { protocolVersion: 1, role: 1, name: 'fuzz', softwareVersion: 'fuzz' } }).finish(),
  );

/** Sends well-formed requests in pipelined batches on one connection; resolves with how many were answered. */
async function wellFormedBatch(count: number): Promise<{ sent: number; answered: number; closed: boolean }> {
  const ws = await open();
  let answered = 0;
  let closed = false;
  const done = new Promise<void>((resolve) => {
    ws.on('message', () => {
      answered++;
      if (answered === count + 1) resolve();
    });
    ws.on('close', () => {
      closed = true;
      resolve();
    });
  });
  ws.send(hello());
  for (let i = 0; i < count; i++) ws.send(Envelope.encode({ ...wellFormed(), id: 2 + i }).finish());
  const timeout = setTimeout(() => ws.terminate(), 30_000);
  await done;
  clearTimeout(timeout);
  ws.terminate();
  return { sent: count, answered: answered - 1, closed };
}

/** One garbage message on a connection of its own; resolves when the agent has answered or closed. */
async function garbageOne(afterHello: boolean): Promise<void> {
  const ws = await open();
  // Ends when the agent closes the connection, or has answered the garbage (a bit flip can leave a valid request).
  let answers = 0;
  const finished = new Promise<void>((resolve) => {
    ws.on('close', () => resolve());
    ws.on('message', () => {
      if (++answers === (afterHello ? 2 : 1)) resolve();
    });
    setTimeout(() => resolve(), 5_000).unref();
  });
  if (afterHello) ws.send(hello());
  const g = garbage();
  ws.send(g.data, { binary: g.binary });
  await finished;
  ws.terminate();
}

function status(pid: number): { rss: number; hwm: number } {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0) * 1024;
  return { rss: kib('VmRSS'), hwm: kib('VmHWM') };
}

describe('an agent under hostile input', () => {
  it(`survives ${TOTAL.toLocaleString('en')} random and mutated messages, then migrates a real workload`, async () => {
    console.log(`fuzz seed ${SEED} (FERRY_FUZZ_SEED=${SEED} replays it)`);
    const agentPid = a.pid;
    const before = status(agentPid);
    const started = performance.now();
    let sent = 0;
    let answered = 0;
    let garbageSent = 0;
    let peakRss = before.rss;
    let halfwayRss = 0;
    while (sent < TOTAL) {
      const n = Math.min(BATCH, TOTAL - sent);
      const garbageCount = Math.ceil(n / GARBAGE_EVERY);
      const batch = await wellFormedBatch(n - garbageCount);
      answered += batch.answered;
      // Garbage, four connections at a time.
      for (let i = 0; i < garbageCount; i += 4) {
        await Promise.all(Array.from({ length: Math.min(4, garbageCount - i) }, () => garbageOne(random() < 0.9)));
      }
      garbageSent += garbageCount;
      sent += n;
      // Never crashed, never hung: the same agent answers a fresh connection at once.
      expect(existsSync(`/proc/${agentPid}`), 'the agent is alive').toBe(true);
      const probe = performance.now();
      await listWorkloads(hostEndpoint(a), 'fuzz');
      expect(performance.now() - probe).toBeLessThan(5_000);
      const rss = status(agentPid).rss;
      peakRss = Math.max(peakRss, rss);
      if (halfwayRss === 0 && sent >= TOTAL / 2) halfwayRss = rss;
    }
    // An oversized frame and a frame before any hello, for good measure.
    const big = await open();
    await new Promise<void>((resolve) => {
      big.on('close', () => resolve());
      big.on('error', () => resolve());
      big.send(Buffer.alloc(MAX_FRAME_BYTES + 1));
    });
    await garbageOne(false);
    const elapsed = performance.now() - started;
    const after = status(agentPid);
    console.log(
      `fuzz: ${sent.toLocaleString('en')} messages (${garbageSent.toLocaleString('en')} garbage, each on its own connection; ` +
        `${answered.toLocaleString('en')} well-formed answered) in ${(elapsed / 1000).toFixed(1)} s; ` +
        `agent RSS ${(before.rss / 2 ** 20).toFixed(0)} → ${(halfwayRss / 2 ** 20).toFixed(0)} (halfway) → ${(after.rss / 2 ** 20).toFixed(0)} MiB, peak sampled ${(peakRss / 2 ** 20).toFixed(0)} MiB, high-water ${(after.hwm / 2 ** 20).toFixed(0)} MiB`,
    );
    expect(sent).toBeGreaterThanOrEqual(TOTAL);
    expect(answered).toBeGreaterThan((TOTAL * 0.9 * (GARBAGE_EVERY - 1)) / GARBAGE_EVERY);
    expect(existsSync(`/proc/${agentPid}`)).toBe(true);
    // Bounded: whatever the heap settles at, the second half of the run does not keep adding to it.
    expect(after.rss - before.rss, 'memory growth').toBeLessThan(96 * 2 ** 20);
    expect(after.rss - halfwayRss, 'memory growth in the second half').toBeLessThan(24 * 2 ** 20);
    // Nothing was written where a fuzzed name pointed, and no migration directory was left behind.
    expect(existsSync(canary)).toBe(false);
    expect(readdirSync(a.imagesDir).filter((d) => !d.startsWith('cpu'))).toEqual([]);

    // A real migration right after.
    const dir = mkdtempSync(join(scratch, 'after-'));
    await runWorkload(
      hostEndpoint(a),
      'afterfuzz',
      [join(projectRoot(), 'dist', 'examples', 'counter'), join(dir, 'state')],
      'test',
    );
    const report = await migrate({
      workload: 'afterfuzz',
      from: hostEndpoint(a),
      to: hostEndpoint(lab.hosts[1] as LabHost),
      softwareVersion: 'test',
    });
    expect(report.to.pid).toBeGreaterThan(0);
    process.kill(report.to.pid, 'SIGKILL');
  }, 600_000);
});
