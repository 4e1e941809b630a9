import { createHash } from 'node:crypto';
import {
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
} from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect, createSecureContext, type ConnectionOptions, type SecureContext } from 'node:tls';
import { uniformInt } from 'pure-rand/distribution/uniformInt';
import { xoroshiro128plus } from 'pure-rand/generator/xoroshiro128plus';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { hostEndpoint, labDown, labUp, type Lab, type LabHost } from '../helpers/lab.js';
import { migrate } from '../../controller/migration/index.js';
import { listWorkloads, runWorkload } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { startTime } from '../../src/proc.js';
import { clientOptions, loadIdentity, type Identity } from '../../src/tls/index.js';
import {
  Envelope,
  HOLD_MS,
  IMAGE_CHUNK_BYTES,
  MAX_FRAME_BYTES,
  MAX_PID,
  PROTOCOL_VERSION,
  WireConnection,
  type Body,
  type EnvelopeMessage,
} from '../../src/wire/index.js';
import { counterOn, homeFile, killOn, onHost } from '../helpers/hosts.js';
import { requireRoot } from '../helpers/root.js';
import { sleep, waitFor } from '../helpers/wait.js';

/**
 * A live agent (lab host a, mutual TLS) gets at least 100,000 random and
 * mutated messages over thousands of connections: well-formed requests with
 * hostile values pipelined on a connection, then most connections end with
 * protocol garbage, which the agent answers by closing them. The agent must
 * not crash, hang, grow without bound, leak sockets or write anything named
 * by a hostile path, and a real migration from it must work right after.
 *
 * FERRY_FUZZ_SEED=N replays a run: connection k's messages come from a
 * generator seeded with (N, k), so they are the same whatever the timing.
 * FERRY_FUZZ_MESSAGES=N changes the count.
 */

/** Labs are machine-wide; this one is this run's own (other suites may fuzz a lab of their own at the same time). */
const LAB = `fz${process.pid % 100_000}`;
const TOTAL = Number(process.env.FERRY_FUZZ_MESSAGES ?? 100_000);
const SEED = Number(process.env.FERRY_FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));
/** Connections open at once. The agent is one Node process; more only queue. */
const CONCURRENCY = 24;
/** Requests a fuzzing connection keeps waiting at once; the agent cuts off a peer past 64. */
const WINDOW = 32;
/** Connections between two liveness checks. */
const BATCH = 240;
/** Longest the agent may take to answer anything, or to close after garbage, before it counts as hung. */
const ANSWER_MS = 15_000;
/**
 * Every name that must be refused carries this token; no file or directory
 * with it may exist anywhere afterwards. Legitimate names never carry it.
 */
const TOKEN = `ferryfuzz${SEED}`;

let lab: Lab;
let a: LabHost;
let b: LabHost;
let controller: Identity;
/** Host b's agent certificate: what another node would hold. */
let agentCert: Identity;
/** Made once: a context per connection would cost the client more than the agent's whole answer. */
let contexts: Record<'controller' | 'agent' | 'anonymous', SecureContext>;
let pidMax = 32768;
/** A directory hostile names point into: on this machine, and the same path on host a, where the agent runs. */
const scratch = mkdtempSync(join(tmpdir(), 'ferry-fuzz-'));

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB });
  [a, b] = lab.hosts as [LabHost, LabHost];
  mkdirSync(onHost(a, scratch), { recursive: true });
  controller = loadIdentity(lab.controllerTls ?? '');
  // From b's own disk, where its agent keeps it.
  agentCert = loadIdentity(onHost(b, b.tlsDir ?? ''));
  contexts = {
    controller: createSecureContext(clientOptions(controller)),
    agent: createSecureContext(clientOptions(agentCert)),
    anonymous: createSecureContext({ ca: controller.ca }),
  };
  pidMax = Number(readFileSync('/proc/sys/kernel/pid_max', 'utf8'));
}, 120_000);

afterAll(async () => {
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

type Random = ReturnType<typeof xoroshiro128plus>;

/** Draws from one connection's own generator. */
class Draw {
  constructor(readonly rng: Random) {}
  int(n: number): number {
    return n <= 1 ? 0 : uniformInt(this.rng, 0, n - 1);
  }
  chance(p: number): boolean {
    return this.int(1_000_000) < p * 1_000_000;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)] as T;
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i += 4) {
      const word = this.rng.next();
      for (let j = 0; j < 4 && i + j < n; j++) b[i + j] = (word >>> (8 * j)) & 0xff;
    }
    return b;
  }
  word(alphabet: string, min: number, max: number): string {
    let s = '';
    for (let i = min + this.int(max - min + 1); i > 0; i--) s += alphabet.charAt(this.int(alphabet.length));
    return s;
  }
}

const LOWER = 'abcdefghijklmnopqrstuvwxyz0123456789';
const NAME_CHARS = 'ABCabcxyz0123456789._-';

/** Migrations opened for real before the fuzzing: hostile chunks go into their live image streams. */
const OPEN = ['m-fuzz-0', 'm-fuzz-1', 'm-fuzz-2', 'm-fuzz-3'];
/** Migrations the fuzzing prepared (their ids are drawn, so known only as they go); aborted at the end. */
const prepared = new Set<string>();

/** Values valid on the wire that name nothing here. */
function values(d: Draw) {
  return {
    id: (): string => (d.chance(0.3) ? d.pick(OPEN) : d.pick([...LOWER]) + d.word(`${LOWER}-`, 0, 30)),
    round: (): string => (d.chance(0.6) ? 'final' : String(d.int(1000))),
    imageName: (): string => d.pick([...'ABCabc019']) + d.word(NAME_CHARS, 0, 40),
    /** Above pid_max: a valid PID on the wire that is never a process here, so nothing is ever frozen. */
    absentPid: (): number => pidMax + 1 + d.int(MAX_PID - pidMax),
    hold: (): number => d.pick([0, HOLD_MS.min, HOLD_MS.min + d.int(60_000), HOLD_MS.max]),
    // Only this machine's own addresses: nothing may leave it.
    url: (): string => d.pick(['wss://127.0.0.1:1', 'ws://127.0.0.1:9', `wss://${a.address}:1`, 'wss://[::1]:7']),
  };
}

/** Well-formed requests and events with hostile content: valid, so the agent must answer each and carry on. */
function wellFormed(d: Draw): Body {
  const v = values(d);
  const r = d.int(10_000);
  // The costly ones (CRIU, process starts, synced journal records) are rare, so the run stays short.
  if (r < 2) return { factsQuery: d.chance(0.5) ? { pid: v.absentPid() } : { workload: v.imageName() } };
  if (r < 4) return { cpuCheck: { cpuinfo: d.bytes(d.int(2048)) } };
  if (r < 5) return { runWorkload: { name: `fuzz-${d.int(50)}`, argv: [join(scratch, 'no-such-program'), 'x'] } };
  if (r < 15) return { setDraining: { draining: d.chance(0.5) } };
  if (r < 35) return { recover: {} };
  if (r < 45) {
    const migrationId = `m-${d.word(LOWER, 1, 20)}`;
    prepared.add(migrationId);
    return { prepareDestination: { migrationId, sourceUrl: v.url(), holdMs: v.hold() } };
  }
  if (r < 3300) {
    // Chunks for streams that were opened and for ones that never were, in and out of order.
    return {
      imageChunk: {
        migrationId: v.id(),
        round: v.round(),
        name: v.imageName(),
        offset: d.pick([0, 0, 0, d.int(4096), d.int(2 ** 40)]),
        data: d.bytes(d.chance(0.002) ? IMAGE_CHUNK_BYTES : d.int(2048)),
      },
    };
  }
  if (r < 3800) {
    const files = Array.from({ length: d.int(12) }, () => ({
      name: v.imageName(),
      size: d.pick([0, d.int(5000), d.int(2 ** 52)]),
      sha256: d.bytes(32).toString('hex'),
    }));
    return { imagesDone: { migrationId: v.id(), round: v.round(), files } };
  }
  const forms: (() => Body)[] = [
    () => ({ commit: { migrationId: v.id() } }),
    () => ({ resume: { migrationId: v.id(), downtimeBeforeMs: d.int(2 ** 32) } }),
    () => ({
      abort: { migrationId: d.pick([...LOWER]) + d.word(LOWER, 0, 20), reason: d.word('xyz \n\t"\\', 0, 300) },
    }),
    () => ({ outcomeQuery: { migrationId: v.id() } }),
    () => ({ restore: { migrationId: d.word(LOWER, 1, 10), round: v.round(), holdMs: v.hold() } }),
    () => ({
      pageServerStart: { migrationId: d.word(LOWER, 1, 10), round: v.round(), parent: '', plainPages: d.chance(0.5) },
    }),
    () => {
      const body = {
        migrationId: v.id(),
        round: v.round(),
        parent: d.chance(0.5) ? '' : v.round(),
        pid: v.absentPid(),
        pageServerAddress: d.pick(['127.0.0.1', '::1', a.address]),
        pageServerPort: 1 + d.int(65535),
        plainPages: d.chance(0.5),
      };
      return d.chance(0.5)
        ? { preDumpRound: body }
        : { finalDump: { ...body, destinationUrl: v.url(), holdMs: v.hold() } };
    },
    () => ({ listWorkloads: {} }),
    () => ({ statusQuery: {} }),
    () => ({ nodeQuery: {} }),
    // Answers sent as if they were requests: refused, never acted on.
    () =>
      d.pick<Body>([
        { ack: {} },
        { welcome: { protocolVersion: 1 } },
        { resumed: { pid: 1 } },
        { committed: {} },
        { dumpHeld: { imageFiles: 1 } },
        { restored: { pid: 1 } },
        { outcome: { state: 'committed' } },
        { facts: { agentName: 'x', process: { pid: 1, exists: true } } },
        { pageServerStarted: { address: '127.0.0.1', port: 1 } },
        { roundDone: { durationMs: 1 } },
        { workload: { name: 'x', pid: 1, argv: ['x'] } },
        { workloadList: {} },
        { migrationList: {} },
        { nodeFacts: { name: 'x' } },
      ]),
  ];
  return d.pick(forms)();
}

/** Frames the agent takes without answering: progress events, and answers to requests it never made. */
function silent(d: Draw): EnvelopeMessage {
  return d.chance(0.5)
    ? { progress: { migrationId: d.word(LOWER, 1, 10), phase: d.word(LOWER, 0, 20), pages: d.int(2 ** 30) } }
    : { replyTo: 2 + d.int(1000), ack: {} };
}

/** Garbage that still decodes as a progress event or an answer (id 0): the protocol answers neither. */
function isEvent(g: Garbage): boolean {
  if (!g.binary) return false;
  try {
    const e = Envelope.decode(g.data as Uint8Array);
    return (e.id ?? 0) === 0 && ((e.progress !== undefined && e.progress !== null) || (e.replyTo ?? 0) !== 0);
  } catch {
    return false;
  }
}

interface Garbage {
  data: Uint8Array | string;
  binary: boolean;
}

/** Protocol garbage and escaping names: the agent must refuse each and close that connection, nothing more. */
function garbage(d: Draw, nextId: number): Garbage {
  const encode = (m: EnvelopeMessage): Buffer => Buffer.from(Envelope.encode(m).finish());
  const bin = (m: EnvelopeMessage): Garbage => ({ data: encode({ id: nextId, ...m }), binary: true });
  const valid = (): Buffer => encode({ ...wellFormedCheap(d), id: nextId });
  const escaping = (): string =>
    d.pick([
      `../${TOKEN}`,
      `../../${TOKEN}`,
      `../../../../../../tmp/${TOKEN}`,
      `/tmp/${TOKEN}`,
      `/etc/${TOKEN}`,
      `/dev/shm/${TOKEN}`,
      join(scratch, TOKEN),
      `${TOKEN}/../../x`,
      `a/${TOKEN}`,
      `${TOKEN}\0.img`,
      `..${TOKEN}`,
      `.${TOKEN}`,
      `${TOKEN} -> /etc/passwd`,
      `/proc/self/cwd/${TOKEN}`,
      `${TOKEN}\n`,
      `\u2025${TOKEN}`,
      `${TOKEN}${'x'.repeat(200)}`,
      '..',
      '.',
      '',
    ]);
  const v = values(d);
  switch (d.int(25)) {
    case 0:
      return { data: d.bytes(d.int(512)), binary: true };
    case 1:
      return { data: d.bytes(d.int(64 * 1024)), binary: true };
    case 2: {
      const b = valid();
      for (let i = 0; i <= d.int(8) && b.length > 0; i++) {
        const at = d.int(b.length);
        b[at] = (b[at] ?? 0) ^ (1 << d.int(8));
      }
      return { data: b, binary: true };
    }
    case 3: {
      const b = valid();
      return { data: b.subarray(0, d.int(b.length)), binary: true };
    }
    case 4:
      return { data: d.word('{}[]"abc:, \n', 1, 300), binary: false };
    case 5:
      // Larger than any frame either end accepts.
      return { data: Buffer.alloc(MAX_FRAME_BYTES + 1 + d.int(1024 * 1024)), binary: true };
    case 6:
      return bin({
        imageChunk: { migrationId: v.id(), round: v.round(), name: escaping(), offset: 0, data: Buffer.from(TOKEN) },
      });
    case 7:
      return bin({
        imagesDone: {
          migrationId: v.id(),
          round: v.round(),
          files: [{ name: escaping(), size: 1, sha256: createHash('sha256').update('x').digest('hex') }],
        },
      });
    case 8:
      return bin({ prepareDestination: { migrationId: escaping(), sourceUrl: v.url(), holdMs: HOLD_MS.max } });
    case 9:
      return bin({
        pageServerStart: { migrationId: d.pick(OPEN), round: d.pick(['../..', `../${TOKEN}`, '1000', '-1']) },
      });
    case 10:
      return bin({ factsQuery: { pid: d.pick([-1, -(2 ** 31), MAX_PID + 1]), workload: escaping() } });
    case 11:
      return bin({ runWorkload: { name: escaping(), argv: [join(scratch, TOKEN)] } });
    case 12:
      // Roles the enum does not have.
      return bin({ hello: { protocolVersion: 1, role: d.pick([3, 7, 100, -1]) as 1, name: 'x' } });
    case 13: {
      // 64-bit sizes and offsets no double holds, and negative ones.
      const huge = d.pick([2 ** 60, -1, -(2 ** 40)]);
      return d.chance(0.5)
        ? bin({ imageChunk: { migrationId: d.pick(OPEN), round: 'final', name: v.imageName(), offset: huge } })
        : bin({
            imagesDone: {
              migrationId: d.pick(OPEN),
              round: 'final',
              files: [{ name: v.imageName(), size: huge, sha256: 'a'.repeat(64) }],
            },
          });
    }
    case 14:
      return bin({
        finalDump: {
          migrationId: v.id(),
          round: 'final',
          pid: d.pick([0, -1, MAX_PID + 1, 2 ** 31 - 1]),
          pageServerAddress: d.pick(['localhost', '', '999.1.1.1', '127.0.0.1']),
          pageServerPort: d.pick([0, 65536, 2 ** 32 - 1, 80]),
          destinationUrl: d.pick(['file:///etc/passwd', 'http://127.0.0.1:1', 'wss://127.0.0.1:1/x', '']),
          holdMs: d.pick([1, 999, 2 ** 32 - 1]),
        },
      });
    case 15:
      return bin({
        prepareDestination: {
          migrationId: `m-${d.word(LOWER, 1, 10)}`,
          sourceUrl: d.pick(['', 'file:///etc/passwd', 'wss://user:pw@127.0.0.1:1', 'gopher://127.0.0.1:70']),
          holdMs: d.pick([1, 10, 86_400_001]),
        },
      });
    case 16:
      return bin({
        runWorkload: {
          name: 'w',
          argv: d.pick([[], ['', 'x'], ['/bin/true\0x'], Array.from({ length: 257 }, () => 'x'), ['x'.repeat(4097)]]),
        },
      });
    case 17: {
      const labels = Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`k${i}`, 'v']));
      return bin({ runWorkload: { name: 'w', argv: ['x'], labels: d.chance(0.5) ? labels : { 'Bad Key': 'v' } } });
    }
    case 18:
      // Two bodies in one envelope, each valid alone.
      return { data: Buffer.concat([valid(), encode({ statusQuery: {} })]), binary: true };
    case 19:
      return { data: encode({ id: nextId, replyTo: 1, listWorkloads: {} }), binary: true };
    case 20:
      // A field number no body has: an envelope with no body.
      return { data: Buffer.from([0x08, nextId & 0x7f, 0xf8, 0x06, 0x01]), binary: true };
    case 21:
      return bin({ hello: { protocolVersion: d.pick([0, 2, 2 ** 32 - 1]), role: 1, name: 'x' } });
    case 22:
      // Hello again, on a connection that already said it.
      return bin({ hello: { protocolVersion: PROTOCOL_VERSION, role: 1, name: 'again' } });
    case 23:
      // A failure that answers nothing: the peer says it is closing, so the agent stops listening.
      return bin({ failure: { code: 'X', message: d.word(LOWER, 0, 50) } });
    default:
      return d.chance(0.5)
        ? { data: Buffer.alloc(0), binary: true }
        : bin({ hello: { protocolVersion: 1, role: 1, name: d.pick(['../x', 'a\nb', '\u001b[2J', 'x'.repeat(65)]) } });
  }
}

/** A valid request to mutate: the cheap ones, so a mutation that stays valid costs the agent little. */
function wellFormedCheap(d: Draw): Body {
  for (;;) {
    const body = wellFormed(d);
    if (!body.factsQuery && !body.cpuCheck && !body.runWorkload && !body.prepareDestination && !body.setDraining)
      return body;
  }
}

const stats = {
  sent: 0,
  garbage: 0,
  answered: 0,
  violations: 0,
  connections: 0,
  refusedConnections: 0,
  rawSockets: 0,
};

class Hang extends Error {}

/** One fuzzing connection, k-th of the run; resolves when it is over, rejects if the agent stopped answering. */
async function session(k: number): Promise<void> {
  const d = new Draw(xoroshiro128plus((SEED ^ Math.imul(k + 1, 0x9e3779b1)) >>> 0));
  const kind = d.int(100);
  if (kind < 1) return rawSocket(d);
  // Most speak as the controller; some as another agent, whose certificate allows only image streams
  // and outcomes; a few claim a role their certificate does not give, or show no certificate at all.
  const role = kind < 10 ? 'agent' : kind < 12 ? 'liar' : kind < 13 ? 'anonymous' : 'controller';
  // ws hands TLS options on to tls.connect, the secure context included.
  const options: WebSocket.ClientOptions & ConnectionOptions = {
    secureContext: contexts[role === 'liar' ? 'agent' : role],
    minVersion: 'TLSv1.3',
    maxPayload: 64 * MAX_FRAME_BYTES,
  };
  const ws = new WebSocket(a.url, options);
  stats.connections++;
  let closed = false;
  let waiting = 0;
  let onAnswer: (() => void) | undefined;
  let sawViolation = false;
  const gone = new Promise<void>((resolve) => {
    ws.on('close', () => {
      closed = true;
      onAnswer?.();
      resolve();
    });
    ws.on('error', () => undefined);
  });
  ws.on('message', (data: Buffer) => {
    const reply = Envelope.decode(data);
    if (reply.failure?.code === 'WIRE_PROTOCOL') sawViolation = true;
    if ((reply.replyTo ?? 0) !== 0) {
      waiting--;
      stats.answered++;
      onAnswer?.();
    }
  });
  const opened = await new Promise<boolean>((resolve) => {
    ws.once('open', () => resolve(true));
    ws.once('error', () => resolve(false));
    ws.once('close', () => resolve(false));
  });
  if (!opened) {
    stats.refusedConnections++;
    if (role !== 'anonymous') throw new Error(`connection ${k} (${role}) was refused`);
    return;
  }
  /** Until fewer than `limit` requests wait, the connection closed, or the agent took too long. */
  const drain = async (limit: number): Promise<void> => {
    const deadline = Date.now() + ANSWER_MS;
    while (waiting >= limit && !closed) {
      await new Promise<void>((resolve) => {
        onAnswer = resolve;
        setTimeout(resolve, 200).unref();
      });
      onAnswer = undefined;
      if (Date.now() > deadline) throw new Hang(`connection ${k}: ${waiting} requests unanswered for ${ANSWER_MS} ms`);
    }
  };
  const send = (frame: Uint8Array | string, binary = true): void => {
    if (!closed) ws.send(frame, { binary });
    stats.sent++;
  };
  try {
    let id = 1;
    if (d.chance(0.95)) {
      const claimed = role === 'liar' ? 1 : role === 'agent' ? 2 : 1;
      ws.send(
        Envelope.encode({
          id: id++,
          hello: { protocolVersion: PROTOCOL_VERSION, role: claimed, name: 'fuzz' },
        }).finish(),
      );
      waiting++;
    }
    const count = d.int(41);
    for (let i = 0; i < count && !closed; i++) {
      if (d.chance(0.05)) {
        send(Envelope.encode(silent(d)).finish());
        continue;
      }
      await drain(WINDOW);
      send(Envelope.encode({ ...wellFormed(d), id: ++id }).finish());
      waiting++;
    }
    await drain(1);
    if (!closed && d.chance(0.85)) {
      // Garbage last: the agent answers it with a failure and closes, or (a mutation that stayed valid) answers it.
      const g = garbage(d, ++id);
      send(g.data, g.binary);
      stats.garbage++;
      // A mutation can land on an event, which is answered by nothing: then nothing is waited for.
      if (!isEvent(g)) waiting++;
      const deadline = Date.now() + ANSWER_MS;
      while (!closed && waiting > 0 && !sawViolation) {
        if (Date.now() > deadline) throw new Hang(`connection ${k}: neither an answer nor a close after garbage`);
        await new Promise<void>((resolve) => {
          onAnswer = resolve;
          setTimeout(resolve, 200).unref();
        });
        onAnswer = undefined;
      }
      if (sawViolation) {
        stats.violations++;
        await Promise.race([
          gone,
          sleep(ANSWER_MS).then(() => Promise.reject(new Hang(`connection ${k}: not closed after a violation`))),
        ]);
      }
    }
  } finally {
    ws.terminate();
  }
}

/** Bytes that are not even WebSocket: over TLS before the upgrade, or plaintext to the TLS port. */
async function rawSocket(d: Draw): Promise<void> {
  stats.rawSockets++;
  const [host, port] = [a.address, Number(new URL(a.url).port)];
  const socket: Socket = d.chance(0.5)
    ? tlsConnect({ host, port, ...clientOptions(controller), checkServerIdentity: () => undefined })
    : netConnect({ host, port });
  socket.on('error', () => undefined);
  await new Promise<void>((resolve) => {
    socket.once('connect', () => resolve());
    socket.once('secureConnect', () => resolve());
    socket.once('close', () => resolve());
  });
  socket.write(
    d.chance(0.5) ? d.bytes(1 + d.int(4096)) : `GET /${TOKEN} HTTP/1.1\r\nHost: x\r\n${d.word('ab:\r\n', 0, 200)}`,
  );
  await sleep(50);
  socket.destroy();
}

/** The agent's memory, from the kernel's view of its process. */
function memory(pid: number): { rss: number; hwm: number } {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0) * 1024;
  return { rss: kib('VmRSS'), hwm: kib('VmHWM') };
}

const openFiles = (pid: number): number => readdirSync(`/proc/${pid}/fd`).length;
const mib = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(0)} MiB`;

/** Entries whose name holds the token, under `dir` down to `depth` levels, not following symlinks. */
function withToken(dir: string, depth: number, found: string[] = []): string[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return found;
  }
  for (const name of names) {
    const path = join(dir, name);
    if (name.includes(TOKEN)) found.push(path);
    if (depth > 0 && name !== 'proc' && name !== 'sys') {
      try {
        if (lstatSync(path).isDirectory()) withToken(path, depth - 1, found);
      } catch {
        // gone meanwhile
      }
    }
  }
  return found;
}

/** CRIU's page servers in host a, waiting for a dump (CRIU retitles them "criu: page-server ..."). */
/**
 * The page ports the agent of host a listens on: a PageServerStart opens
 * one (CRIU's page server starts only when the source connects to it), and
 * the end of its migration closes it. Listening TCP sockets of a's network
 * namespace on its address, other than the agent's own port.
 */
function pagePorts(): number[] {
  const hex = a.address
    .split('.')
    .reverse()
    .map((n) => Number(n).toString(16).padStart(2, '0').toUpperCase())
    .join('');
  const agentPort = Number(new URL(a.url).port);
  return readFileSync(`/proc/${a.pid}/net/tcp`, 'utf8')
    .split('\n')
    .slice(1)
    .map((line) => line.trim().split(/\s+/))
    .filter((f) => f[3] === '0A' && f[1]?.startsWith(`${hex}:`))
    .map((f) => parseInt(f[1]?.split(':')[1] ?? '0', 16))
    .filter((port) => port !== agentPort);
}

describe('an agent under hostile input', () => {
  it(`survives ${TOTAL.toLocaleString('en')} random and mutated messages, then migrates a real workload`, async () => {
    console.log(`fuzz seed ${SEED} (FERRY_FUZZ_SEED=${SEED} replays it)`);
    const agentPid = a.pid;
    const agentStart = startTime(agentPid);
    const passwd = readFileSync('/etc/passwd');
    const passwdOnA = readFileSync(onHost(a, '/etc/passwd'));
    const endpoint = hostEndpoint(a);

    // Live image streams for the hostile chunks to land in: prepared destinations with page servers.
    const controllerConnection = (): Promise<WireConnection> =>
      WireConnection.connect(a.url, { role: 'controller', name: 'fuzz', softwareVersion: 'fuzz' }, { tls: controller });
    let c = await controllerConnection();
    const serversBefore = pagePorts().length;
    for (const migrationId of OPEN) {
      await c.request(
        { prepareDestination: { migrationId, sourceUrl: 'wss://127.0.0.1:1', holdMs: HOLD_MS.max } },
        'ack',
      );
      await c.request({ pageServerStart: { migrationId, round: 'final' } }, 'pageServerStarted');
    }
    const serversFuzzing = pagePorts().length;
    c.close();
    await sleep(500);
    const filesBefore = openFiles(agentPid);
    const before = memory(agentPid);

    const started = performance.now();
    let next = 0;
    let halfway: number | undefined;
    let peakRss = before.rss;
    let slowestProbe = 0;
    while (stats.sent < TOTAL) {
      const batchEnd = next + BATCH;
      await Promise.all(
        Array.from({ length: CONCURRENCY }, async () => {
          while (next < batchEnd && stats.sent < TOTAL) await session(next++);
        }),
      );
      // Never crashed: the same process throughout. Never hung: a fresh connection gets an answer at once.
      expect(startTime(agentPid), 'the agent is the same process').toBe(agentStart);
      const probe = performance.now();
      await listWorkloads(endpoint, 'fuzz');
      slowestProbe = Math.max(slowestProbe, performance.now() - probe);
      const rss = memory(agentPid).rss;
      peakRss = Math.max(peakRss, rss);
      if (halfway === undefined && stats.sent >= TOTAL / 2) halfway = rss;
    }
    const elapsed = performance.now() - started;

    // The fuzzing's own migrations are settled the way a controller would: abort.
    c = await controllerConnection();
    for (const migrationId of prepared) await c.request({ abort: { migrationId, reason: 'fuzz' } }, 'ack');
    await c.request({ setDraining: { draining: false } }, 'nodeFacts');
    // A restore from a stream full of hostile chunks fails cleanly and takes its images with it.
    const restore = await c
      .request({ restore: { migrationId: 'm-fuzz-0', round: 'final' } }, 'restored', { timeoutMs: 60_000 })
      .catch((error: unknown) => error as Error);
    expect(restore).toBeInstanceOf(Error);
    for (const migrationId of OPEN.slice(1)) await c.request({ abort: { migrationId, reason: 'fuzz' } }, 'ack');
    c.close();

    const after = memory(agentPid);
    console.log(
      `fuzz: ${stats.sent.toLocaleString('en')} messages in ${(elapsed / 1000).toFixed(1)} s ` +
        `(${Math.round(stats.sent / (elapsed / 1000)).toLocaleString('en')}/s) over ${stats.connections.toLocaleString('en')} connections: ` +
        `${stats.garbage.toLocaleString('en')} ended in garbage (${stats.violations.toLocaleString('en')} refused as violations), ` +
        `${stats.answered.toLocaleString('en')} answers, ${stats.refusedConnections} connections refused, ${stats.rawSockets} raw sockets; ` +
        `slowest probe ${slowestProbe.toFixed(0)} ms; page ports ${serversBefore} → ${serversFuzzing} → ${pagePorts().length}; agent RSS ${mib(before.rss)} → ${mib(halfway ?? 0)} (halfway) → ${mib(after.rss)}, ` +
        `peak sampled ${mib(peakRss)}, high-water ${mib(after.hwm)}; open files ${filesBefore} → ${openFiles(agentPid)}`,
    );

    expect(stats.sent).toBeGreaterThanOrEqual(TOTAL);
    expect(startTime(agentPid)).toBe(agentStart);
    expect(slowestProbe).toBeLessThan(5_000);
    // Bounded: a modest peak, and the second half of the run does not keep adding to it.
    expect(after.hwm, 'peak memory').toBeLessThan(384 * 2 ** 20);
    expect(after.rss - (halfway ?? 0), 'memory growth in the second half').toBeLessThan(32 * 2 ** 20);
    // Every connection is gone from the agent too, whichever way it ended.
    await waitFor(() => openFiles(agentPid) <= filesBefore + 8, { what: 'the agent to close the fuzzing sockets' });

    // Nothing named by a hostile path exists anywhere: on host a (where the agent writes), inside
    // the agent's directories or out, nor on this machine.
    const hostRoots: [string, number][] = [
      ['/', 1],
      ['/etc', 1],
      ['/tmp', 3],
      ['/dev/shm', 5],
      ['/run', 3],
      [a.dataDir, 8],
      // The agent's working directory as its host names it.
      [readlinkSync(`/proc/${agentPid}/cwd`), 2],
      [scratch, 3],
    ];
    const machineRoots: [string, number][] = [
      ['/', 1],
      ['/etc', 1],
      ['/tmp', 3],
      ['/dev/shm', 5],
      [join(lab.dir, '..'), 6],
      [scratch, 3],
    ];
    expect([
      ...hostRoots.flatMap(([dir, depth]) => withToken(onHost(a, dir), depth)),
      ...machineRoots.flatMap(([dir, depth]) => withToken(dir, depth)),
    ]).toEqual([]);
    expect(readFileSync(onHost(a, '/etc/passwd')).equals(passwdOnA)).toBe(true);
    expect(readFileSync('/etc/passwd').equals(passwd)).toBe(true);
    // Every migration it was made to open is gone with its images; its page servers too.
    const imagesOnA = onHost(a, a.imagesDir);
    await waitFor(() => readdirSync(imagesOnA).filter((n) => n.startsWith('m-')).length === 0, {
      what: `the fuzzed migrations' images to go (${readdirSync(imagesOnA).join(' ')})`,
    });
    expect(existsSync(onHost(a, join(a.dataDir, 'draining')))).toBe(false);
    expect(serversFuzzing - serversBefore, 'page ports opened for the fuzzing').toBe(OPEN.length);
    await waitFor(() => pagePorts().length <= serversBefore, {
      what: `page ports of aborted migrations to close (${pagePorts().length}, ${serversBefore} before)`,
    });

    // A real migration right after: the counter keeps its state file in its own directory, which moves with it.
    await runWorkload(endpoint, 'afterfuzz', [join(projectRoot(), 'dist', 'examples', 'counter'), 'state'], 'test');
    await waitFor(() => existsSync(homeFile(a, 'afterfuzz', 'state')), { what: 'the counter to start' });
    const report = await migrate({
      workload: 'afterfuzz',
      from: endpoint,
      to: hostEndpoint(b),
      softwareVersion: 'test',
    });
    // b's copy of its state file.
    const count = (): number => counterOn(b, 'afterfuzz')?.count ?? -1;
    const moved = count();
    expect(moved).toBeGreaterThan(0);
    await waitFor(() => count() > moved + 1, { what: 'the migrated counter to count on b' });
    // Killed only while it is still the counter: PIDs wrap quickly here (b's PID, in b).
    if (readFileSync(onHost(b, `/proc/${report.to.pid}/cmdline`), 'utf8').includes('counter'))
      await killOn(b, report.to.pid);
  }, 600_000);
});

describe('an agent holding a page port for a migration that goes nowhere', () => {
  it('closes the page port no dump came to when the migration is aborted', async () => {
    const c = await WireConnection.connect(
      a.url,
      { role: 'controller', name: 'fuzz', softwareVersion: 'fuzz' },
      { tls: controller },
    );
    const before = pagePorts();
    await c.request(
      { prepareDestination: { migrationId: 'm-nodump', sourceUrl: 'wss://127.0.0.1:1', holdMs: HOLD_MS.max } },
      'ack',
    );
    const started = await c.request(
      { pageServerStart: { migrationId: 'm-nodump', round: 'final' } },
      'pageServerStarted',
    );
    const waiting = pagePorts().filter((port) => !before.includes(port));
    expect(waiting).toEqual([started.port]);
    await c.request({ abort: { migrationId: 'm-nodump', reason: 'no dump will come' } }, 'ack');
    c.close();
    await waitFor(() => !pagePorts().includes(started.port ?? 0), { what: 'the page port to close' });
  });
});

describe('a destination agent and the images it takes', () => {
  it('takes a migration’s image stream from its source’s certificate only, not from any other agent’s', async () => {
    const controllerSide = await WireConnection.connect(
      a.url,
      { role: 'controller', name: 'fuzz', softwareVersion: 'fuzz' },
      { tls: controller },
    );
    const otherAgent = await WireConnection.connect(
      a.url,
      { role: 'agent', name: 'b', softwareVersion: 'fuzz' },
      { tls: agentCert },
    );
    const chunk = (migrationId: string) => ({
      imageChunk: { migrationId, round: 'final', name: 'core-1.img', offset: 0, data: Buffer.from('x') },
    });
    try {
      for (const [migrationId, sourceUrl] of [
        ['m-from-b', b.url],
        ['m-from-elsewhere', 'wss://127.0.0.1:1'],
      ] as const) {
        await controllerSide.request({ prepareDestination: { migrationId, sourceUrl, holdMs: HOLD_MS.max } }, 'ack');
        await controllerSide.request({ pageServerStart: { migrationId, round: 'final' } }, 'pageServerStarted');
      }
      await expect(otherAgent.request(chunk('m-from-b'), 'ack')).resolves.toBeDefined();
      const refused = (await otherAgent.request(chunk('m-from-elsewhere'), 'ack').catch((e: unknown) => e)) as Error;
      expect(refused).toMatchObject({ code: 'NOT_ALLOWED' });
      expect(refused.message).toMatch(/b is not the source of migration m-from-elsewhere/);
      expect(existsSync(onHost(a, join(a.imagesDir, 'm-from-elsewhere', 'final', 'core-1.img')))).toBe(false);
    } finally {
      for (const migrationId of ['m-from-b', 'm-from-elsewhere'])
        await controllerSide.request({ abort: { migrationId, reason: 'test' } }, 'ack');
      otherAgent.close();
      controllerSide.close();
    }
  });
});
