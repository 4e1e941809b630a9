import { isIP } from 'node:net';
import { WireProtocolError } from './errors.js';
import { REQUESTS } from './requests.js';
import { bodyName, IMAGE_CHUNK_BYTES, PeerRole, type BodyName, type BodyOf, type EnvelopeMessage } from './messages.js';

/** A migration id: lower-case letters, digits and dashes (it names directories). */
export const MIGRATION_ID = /^[a-z0-9][a-z0-9-]{0,63}$/;
/** A round directory name: "1", "2", ..., "final". */
export const ROUND_NAME = /^(?:[0-9]{1,3}|final|carry)$/;
/** A workload name: it names files in the agent's data directory. */
export const WORKLOAD_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** An image file name: one plain file name in the round's directory, never a path. */
export const IMAGE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** A party's name in Hello and Welcome: a node, host or controller name, printed in messages and logs. */
export const PEER_NAME = /^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$/;

/**
 * How long an agent holds its side of a switchover (0: its default). The
 * floor keeps a lease from spinning: an expired one asks the source again
 * every hold period. The ceiling is a day, well inside what a timer can wait.
 */
export const HOLD_MS = { min: 1_000, max: 86_400_000 } as const;
/** The hold when none is asked for: both agents' leases, and the controller's wait for commit and resume. */
export const DEFAULT_HOLD_MS = 60_000;
/** The largest PID Linux hands out (PID_MAX_LIMIT is 4194304, exclusive). */
export const MAX_PID = 4_194_303;
/** At most this many image files in one round's stream, and in one manifest. */
export const MAX_IMAGE_FILES = 10_000;

/** What an envelope with reply_to may carry: the replies of the request table, a failure, the welcome. */
const ANSWER_BODIES: ReadonlySet<string> = new Set<string>([
  ...Object.values(REQUESTS).map((r) => r.reply),
  'failure',
  'welcome',
]);

const MAX_STRING = 4096;
const MAX_ARGV = 256;
const MAX_FILES = MAX_IMAGE_FILES;
const MAX_LABELS = 32;
const MAX_CARRY = 64;
/** A label key: what `ferry run --label` and `ferry rebalance --exclude` accept. */
export const LABEL_KEY = /^[a-z0-9][a-z0-9._/-]{0,62}$/;
const MAX_LABEL_VALUE = 256;

/**
 * Checks an envelope that arrived, beyond what decoding checks: exactly one
 * body, ids, bounded strings and counts, known enum values, names that
 * cannot escape a directory. Throws WireProtocolError on the first problem.
 */
export function validateEnvelope(e: EnvelopeMessage): void {
  const name = bodyName(e);
  if (name === undefined) fail('an envelope must carry exactly one known body');
  if (e.replyTo !== 0 && e.replyTo !== undefined && e.replyTo !== null && (e.id ?? 0) !== 0) {
    fail('an envelope cannot both ask and answer');
  }
  // Progress is an event: it asks nothing, so one that carries an id would wait for an answer never sent.
  if (name === 'progress' && (e.id ?? 0) !== 0) fail('a progress event cannot ask');
  // An answer carries a reply (or a failure, or the welcome); a request or an event in one would be
  // dropped as an answer to nothing while its sender waits (found by the fuzz test).
  if ((e.replyTo ?? 0) !== 0 && !ANSWER_BODIES.has(name)) fail(`an answer cannot carry ${name}`);
  walkStrings(e, name);
  const check = BOUNDS[name] as ((body: unknown) => void) | undefined;
  check?.(e[name]);
}

type Bounds = { [K in BodyName]?: (body: BodyOf<K>) => void };

/** What each body must hold beyond its types, keyed by the body it checks (ferry.proto's Envelope oneof). */
const BOUNDS: Bounds = {
  hello: (b) => {
    if (b.role !== PeerRole.CONTROLLER && b.role !== PeerRole.AGENT) fail('hello: unknown role');
    pattern(b.name ?? '', PEER_NAME, 'peer name');
    short(b.softwareVersion, 'software version');
  },
  welcome: (b) => {
    pattern(b.agentName ?? '', PEER_NAME, 'agent name');
    short(b.softwareVersion, 'software version');
  },
  factsQuery: (b) => {
    pid(b.pid, true);
    if (b.workload) pattern(b.workload, WORKLOAD_NAME, 'workload name');
    count(b.files, MAX_FILES, 'files');
    for (const f of b.files ?? [])
      if (!(f.path ?? '').startsWith('/') || (f.path ?? '').includes('\0'))
        fail('a file need without an absolute path');
  },
  facts: (b) => {
    bytes(b.cpuinfo, 64 * 1024, 'cpuinfo');
    count(b.takenPids, 64, 'taken PIDs');
    for (const taken of b.takenPids ?? []) pid(taken, false);
    if (b.process) pid(b.process.pid, false);
    for (const rate of [b.restoreBytesPerMs ?? 0, b.pageWriteBytesPerMs ?? 0]) {
      if (!Number.isFinite(rate) || rate < 0) fail('rate out of range');
    }
    count(b.process?.workloadArgv, MAX_ARGV, 'arguments');
    count(b.process?.sockets, MAX_FILES, 'sockets');
    count(b.process?.files, MAX_FILES, 'files');
    count(b.process?.unmovable, 64, 'unmovable resources');
    count(b.fileProblems, MAX_FILES, 'file problems');
    labels(b.process?.workloadLabels);
  },
  cpuCheck: (b) => bytes(b.cpuinfo, 64 * 1024, 'cpuinfo'),
  prepareDestination: (b) => {
    migration(b.migrationId);
    if (b.workload) workloadSpec(b.workload);
    agentUrl(b.sourceUrl, 'source URL');
    hold(b.holdMs);
  },
  pageServerStart: (b) => {
    migration(b.migrationId);
    round(b.round);
    parent(b.parent);
  },
  preDumpRound: (b) => dumpRound(b, true),
  carryAhead: (b) => {
    migration(b.migrationId);
    pid(b.pid, false);
    agentUrl(b.destinationUrl, 'destination URL');
  },
  finalDump: (b) => {
    dumpRound(b, b.postcopy !== true);
    agentUrl(b.destinationUrl, 'destination URL');
    hold(b.holdMs);
  },
  dumpHeld: (b) => {
    if (b.postcopyPort) port(b.postcopyPort, 'lazy page server port');
  },
  pageServerStarted: (b) => {
    address(b.address, 'page server address');
    port(b.port, 'page server port');
  },
  imageChunk: (b) => {
    migration(b.migrationId);
    round(b.round);
    pattern(b.name ?? '', IMAGE_NAME, 'image file name');
    bytes(b.data, IMAGE_CHUNK_BYTES, 'image chunk');
    size(b.offset, 'image offset');
  },
  imagesDone: (b) => {
    migration(b.migrationId);
    round(b.round);
    count(b.files, MAX_FILES, 'image files');
    for (const f of b.files ?? []) {
      pattern(f.name ?? '', IMAGE_NAME, 'image file name');
      pattern(f.sha256 ?? '', /^[0-9a-f]{64}$/, 'sha256');
      size(f.size, 'image size');
    }
  },
  restore: (b) => {
    migration(b.migrationId);
    round(b.round);
    hold(b.holdMs);
    if (b.postcopyPort) {
      address(b.postcopyAddress, 'lazy page server address');
      port(b.postcopyPort, 'lazy page server port');
    }
  },
  restored: (b) => pid(b.pid, false),
  resumed: (b) => pid(b.pid, false),
  commit: (b) => migration(b.migrationId),
  resume: (b) => migration(b.migrationId),
  abort: (b) => migration(b.migrationId),
  outcomeQuery: (b) => migration(b.migrationId),
  outcome: (b) => pattern(b.state ?? '', /^(committed|aborted|pending|unknown)$/, 'outcome'),
  migrationList: (b) => count(b.migrations, MAX_FILES, 'migrations'),
  runWorkload: (b) => {
    pattern(b.name ?? '', WORKLOAD_NAME, 'workload name');
    command(b.argv);
    labels(b.labels);
    carried(b.carry);
    carried(b.shared);
  },
  workloadList: (b) => {
    count(b.workloads, MAX_FILES, 'workloads');
    for (const w of b.workloads ?? []) labels(w.labels);
  },
  nodeFacts: (b) => {
    count(b.workloads, MAX_FILES, 'workloads');
    for (const w of b.workloads ?? []) labels(w.labels);
    if (!Number.isFinite(b.load1 ?? 0) || (b.load1 ?? 0) < 0) fail('load out of range');
  },
};

/** A pre-copy round or the final dump: where it writes, and (but for post-copy) the page server it sends to. */
function dumpRound(b: BodyOf<'preDumpRound'> | BodyOf<'finalDump'>, toPageServer: boolean): void {
  migration(b.migrationId);
  round(b.round);
  parent(b.parent);
  pid(b.pid, false);
  if (toPageServer) {
    address(b.pageServerAddress, 'page server address');
    port(b.pageServerPort, 'page server port');
  }
}

function workloadSpec(w: {
  name?: string | null;
  argv?: string[] | null;
  logFile?: string | null;
  labels?: Record<string, string> | null;
  carry?: string[] | null;
  shared?: string[] | null;
}): void {
  pattern(w.name ?? '', WORKLOAD_NAME, 'workload name');
  command(w.argv);
  if ((w.logFile ?? '').includes('\0')) fail('a workload log path holds a NUL character');
  labels(w.labels);
  carried(w.carry);
  carried(w.shared);
}

/** Paths a workload carries: absolute, normal (no . or .. parts), never the root. */
function carried(paths: readonly string[] | null | undefined): void {
  count(paths, MAX_CARRY, 'carried paths');
  for (const p of paths ?? []) {
    if (p.length > 4096 || p.includes('\0')) fail('a carried path is too long or holds a NUL character');
    if (!p.startsWith('/') || p === '/' || p.split('/').some((part, i) => i > 0 && /^(|\.|\.\.)$/.test(part))) {
      fail(`carried path ${JSON.stringify(p.slice(0, 200))} is not an absolute, normal path below /`);
    }
  }
}

/** A command line to exec: a program and its arguments, none of which can hold a NUL (execve ends strings there). */
function command(argv: readonly string[] | null | undefined): void {
  count(argv, MAX_ARGV, 'arguments');
  if ((argv?.[0] ?? '') === '') fail('a workload needs a command');
  if (argv?.some((arg) => arg.includes('\0'))) fail('an argument holds a NUL character');
}

function labels(value: Record<string, string> | null | undefined): void {
  const entries = Object.entries(value ?? {});
  count(entries, MAX_LABELS, 'labels');
  for (const [key, v] of entries) {
    pattern(key, LABEL_KEY, 'label key');
    if (v.length > MAX_LABEL_VALUE) fail(`label ${key}: value too long`);
  }
}

function fail(message: string): never {
  throw new WireProtocolError(message);
}

function migration(id: string | null | undefined): void {
  pattern(id ?? '', MIGRATION_ID, 'migration id');
}

function round(name: string | null | undefined): void {
  pattern(name ?? '', ROUND_NAME, 'round');
}

function parent(name: string | null | undefined): void {
  if (name !== undefined && name !== null && name !== '') round(name);
}

function pid(value: number | null | undefined, zeroAllowed: boolean): void {
  const n = value ?? 0;
  if (!Number.isInteger(n) || n < (zeroAllowed ? 0 : 1) || n > MAX_PID) fail(`PID out of range: ${n}`);
}

function hold(value: number | null | undefined): void {
  const ms = value ?? 0;
  if (ms !== 0 && (ms < HOLD_MS.min || ms > HOLD_MS.max)) {
    fail(`hold out of range: ${ms} ms (0 for the default, else ${HOLD_MS.min} to ${HOLD_MS.max})`);
  }
}

/** A 64-bit size or offset (protobufjs decodes those as Long): a whole number a double holds exactly. */
function size(value: number | { toString(): string } | null | undefined, what: string): void {
  const n = Number(value ?? 0);
  if (!Number.isSafeInteger(n) || n < 0) fail(`${what} out of range`);
}

function port(value: number | null | undefined, what: string): void {
  const n = value ?? 0;
  if (!Number.isInteger(n) || n < 1 || n > 65535) fail(`${what} out of range: ${n}`);
}

/** CRIU's page server and its clients take numeric IP literals only. */
function address(value: string | null | undefined, what: string): void {
  if (isIP(value ?? '') === 0) fail(`${what} is not an IP address: ${JSON.stringify((value ?? '').slice(0, 80))}`);
}

/** Where one agent connects to another: ws:// or wss://, a host and a port, nothing more. */
function agentUrl(value: string | null | undefined, what: string): void {
  const text = value ?? '';
  let url: URL | undefined;
  try {
    url = new URL(text);
  } catch {
    url = undefined;
  }
  const plain =
    url !== undefined &&
    (url.protocol === 'ws:' || url.protocol === 'wss:') &&
    url.hostname !== '' &&
    url.port !== '' &&
    url.pathname === '/' &&
    url.search === '' &&
    url.hash === '' &&
    url.username === '' &&
    url.password === '';
  if (!plain) fail(`${what} is not ws(s)://HOST:PORT: ${JSON.stringify(text.slice(0, 80))}`);
}

function short(value: string | null | undefined, what: string): void {
  if ((value ?? '').length > 64 || /\p{Cc}/u.test(value ?? '')) fail(`bad ${what}`);
}

function pattern(value: string, re: RegExp, what: string): void {
  if (!re.test(value)) fail(`bad ${what}: ${JSON.stringify(value.slice(0, 80))}`);
}

function bytes(value: Uint8Array | null | undefined, max: number, what: string): void {
  if ((value?.length ?? 0) > max) fail(`${what} too large (${value?.length} bytes, at most ${max})`);
}

function count(value: readonly unknown[] | null | undefined, max: number, what: string): void {
  if ((value?.length ?? 0) > max) fail(`too many ${what} (${value?.length}, at most ${max})`);
}

/** Every string anywhere in the message is bounded. */
function walkStrings(value: unknown, path: string, depth = 0): void {
  if (depth > 6) fail(`${path}: nested too deeply`);
  if (typeof value === 'string') {
    if (value.length > MAX_STRING) fail(`${path}: string too long (${value.length} characters)`);
    return;
  }
  if (Array.isArray(value)) {
    for (const item of value) walkStrings(item, path, depth + 1);
    return;
  }
  if (value !== null && typeof value === 'object' && !(value instanceof Uint8Array)) {
    for (const [key, item] of Object.entries(value)) walkStrings(item, `${path}.${key}`, depth + 1);
  }
}
