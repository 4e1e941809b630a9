/**
 * The roles of an agent wired to fake ports: a fake CRIU that freezes,
 * thaws and kills entries of a fake process table and holds at its
 * notifications as real CRIU does, a fake peer agent, and a real journal
 * in a temporary directory. For the protocol's unit tests (no root, no
 * CRIU, no network): what they prove is the order of decisions, not what
 * CRIU does (the e2e tests prove that).
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DumpOptions, NotifyEvent, RestoreOptions } from '../../src/criu/index.js';
import { AbortedError } from '../../src/errors.js';
import { PeerGoneError } from '../../src/wire/index.js';
import { NO_TEST_HOOKS, type PausePoint, type TestHooks } from '../../src/hooks.js';
import type { ServiceAddress } from '../../src/address.js';
import type { AddressPort } from '../../agent/address.js';
import type { AgentContext } from '../../agent/context.js';
import type { PageLinks } from '../../agent/page-stream.js';
import { DestinationRole } from '../../agent/destination/index.js';
import { Journal } from '../../agent/journal.js';
import { AgentMetrics } from '../../agent/metrics.js';
import { Migrations, type LocalMigration } from '../../agent/migrations.js';
import type { CriuPort, PeerLink, PeerOutcome, Peers, Processes } from '../../agent/ports.js';
import { LearnedRates } from '../../agent/rates.js';
import { Recovery } from '../../agent/recovery.js';
import { SourceRole } from '../../agent/source/index.js';
import { Workloads } from '../../agent/workloads.js';

export type ProcessState = 'running' | 'frozen' | 'stopped' | 'killed';

/** The processes of the fake node: what CRIU and signals did to them. */
export class FakeProcesses implements Processes {
  readonly states = new Map<number, ProcessState>();
  readonly signals: { pid: number; signal: string }[] = [];

  exists(pid: number): boolean {
    const s = this.states.get(pid);
    return s !== undefined && s !== 'killed';
  }
  startTime(pid: number): number | undefined {
    return this.exists(pid) ? 1000 + pid : undefined;
  }
  same(pid: number | undefined, start: number | undefined): boolean {
    return pid !== undefined && start !== undefined && this.startTime(pid) === start;
  }
  tracer(): number {
    return 0;
  }
  /** Established TCP connections every process holds (CRIU's network lock is asked for when any). */
  connections = 0;
  establishedTcp(): number {
    return this.connections;
  }
  signal(pid: number, signal: NodeJS.Signals): void {
    this.signals.push({ pid, signal });
    if (!this.exists(pid)) return;
    if (signal === 'SIGKILL') this.states.set(pid, 'killed');
    if (signal === 'SIGCONT') this.states.set(pid, 'running');
  }
}

/** One answer CRIU heard at a notification, and what the journal said at that moment. */
export interface Heard {
  script: string;
  answer: boolean;
  journal: string | undefined;
}

/** A CRIU that holds at post-dump and post-restore until answered, and honours the call's signal. */
export class FakeCriu implements CriuPort {
  readonly heard: Heard[] = [];
  readonly calls: string[] = [];
  servicePid = undefined;
  /** Make the next dump fail before its hold, as a broken dump would. */
  failDump: string | undefined;
  /** Make the next restore fail before its hold. */
  failRestore: string | undefined;
  /** The post-copy transfer: resolve to end it (fetched), reject to fail it. */
  transfer: { end(): void; fail(why: string): void } | undefined;
  restoredPid = 4242;

  constructor(
    private readonly processes: FakeProcesses,
    private readonly journal: () => Journal,
  ) {}

  version = () => Promise.resolve({ major: 4, minor: 2, sublevel: 1, text: '4.2.1' } as never);
  featureCheck = () => Promise.resolve({ memTrack: true, lazyPages: true, pidfdStore: true } as never);
  cpuinfoDump = () => Promise.resolve();
  cpuinfoCheck = () => Promise.resolve();
  dumpRunId = (): Promise<string | undefined> => Promise.resolve('00000000-fake-run');
  dumpStats = () =>
    Promise.resolve({
      pagesScanned: 0,
      pagesSkippedParent: 0,
      pagesWritten: 0,
      frozenTimeUs: 0,
      memdumpTimeUs: 0,
      memwriteTimeUs: 0,
      freezingTimeUs: 0,
      pagesLazy: 0,
    });
  startLazyPages = () => {
    let exit: (e: { code: number | null; signal: NodeJS.Signals | null }) => void = () => undefined;
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => (exit = r));
    this.fetch = { done: () => exit({ code: 0, signal: null }), lost: () => exit({ code: 1, signal: null }) };
    return { pid: 0, ready: Promise.resolve(), exited, kill: () => exit({ code: null, signal: 'SIGKILL' }) };
  };
  /** The destination's post-copy fetch: done (every page), or lost. */
  fetch: { done(): void; lost(): void } | undefined;

  async preDump(options: { signal?: AbortSignal | undefined }): Promise<void> {
    this.calls.push('preDump');
    await cancellable(new Promise((r) => setTimeout(r, 5)), options.signal);
  }

  pageServer = () => Promise.resolve({ port: 40_000, pid: 999_999, address: '' } as never);

  async dump(options: DumpOptions): Promise<{ restored: boolean }> {
    this.calls.push(options.lazyPages === undefined ? 'dump' : 'lazy dump');
    const pid = options.pid ?? 0;
    this.processes.states.set(pid, 'frozen');
    const thaw = (): void => void (this.processes.exists(pid) && this.processes.states.set(pid, 'running'));
    try {
      await this.#notify(options, 'pre-dump');
      await this.#notify(options, 'query-ext-files');
      if (this.failDump !== undefined) throw new Error(this.failDump);
      const dir = options.imagesDir ?? '';
      if (options.lazyPages !== undefined) {
        await this.#notify(options, 'post-dump');
        writeFileSync(join(dir, 'dump.log'), 'Using 41000 port\n');
        await this.#notify(options, 'status-ready');
        await cancellable(
          new Promise<void>((resolve, reject) => (this.transfer = { end: resolve, fail: (w) => reject(new Error(w)) })),
          options.signal,
        );
        this.processes.states.set(pid, 'stopped'); // leave_stopped
        return { restored: false };
      }
      const go = await this.#notify(options, 'post-dump');
      if (!go) throw new Error('post-dump answered no: the tree was resumed');
      this.processes.states.set(pid, 'killed');
      return { restored: false };
    } catch (error) {
      thaw();
      throw error;
    }
  }

  async restore(options: RestoreOptions): Promise<{ pid: number }> {
    this.calls.push('restore');
    const pid = this.restoredPid;
    if (this.failRestore !== undefined) throw new Error(this.failRestore);
    this.processes.states.set(pid, 'stopped');
    try {
      const go = await this.#notify(options, 'post-restore', pid);
      if (!go) throw new Error('post-restore answered no: the copy was killed');
      this.processes.states.set(pid, 'running');
      return { pid };
    } catch (error) {
      this.processes.states.set(pid, 'killed');
      throw error;
    }
  }

  /** Asks the handler, as CRIU does, racing the call's signal (the client closing its socket). */
  async #notify(
    options: {
      onNotify?: ((e: NotifyEvent) => boolean | Promise<boolean>) | undefined;
      signal?: AbortSignal | undefined;
    },
    script: string,
    pid?: number,
  ): Promise<boolean> {
    const event: NotifyEvent = { script, pid, fds: [], claimFds: () => [] };
    const answer = await cancellable(Promise.resolve(options.onNotify?.(event) ?? true), options.signal);
    const id = this.journal().list().at(-1)?.id;
    this.heard.push({ script, answer, journal: id === undefined ? undefined : this.journal().read(id)?.state });
    return answer;
  }
}

function cancellable<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return promise;
  if (signal.aborted) return Promise.reject(new AbortedError('a CRIU call'));
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(new AbortedError('a CRIU call'));
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

/** The other agent: takes image streams, answers the outcome question as the test says. */
export class FakePeers implements Peers {
  outcomeAnswer: PeerOutcome = 'pending';
  readonly asked: string[] = [];
  readonly sent: string[] = [];

  connect(): Promise<PeerLink> {
    const link = {
      call: (name: string) => {
        this.sent.push(name);
        return Promise.resolve({});
      },
      close: () => undefined,
    };
    return Promise.resolve(link as unknown as PeerLink);
  }

  outcome(id: string): Promise<PeerOutcome> {
    this.asked.push(id);
    return Promise.resolve(this.outcomeAnswer);
  }
}

/** A node's network as the address steps see it: a set of addresses, and a log of what was done. */
export class FakeAddresses implements AddressPort {
  readonly present = new Map<string, string>();
  readonly blocked = new Set<string>();
  readonly log: string[] = [];
  hookFails = false;

  holder(ip: string): Promise<string | undefined> {
    return Promise.resolve(this.present.get(ip));
  }
  add(a: ServiceAddress, device = 'eth0'): Promise<string> {
    this.present.set(a.ip, device);
    this.log.push(`add ${a.cidr}`);
    return Promise.resolve(device);
  }
  remove(a: ServiceAddress): Promise<void> {
    this.present.delete(a.ip);
    this.log.push(`remove ${a.cidr}`);
    return Promise.resolve();
  }
  announce(a: ServiceAddress): void {
    this.log.push(`announce ${a.ip}`);
  }
  block(id: string, a: ServiceAddress): Promise<void> {
    this.blocked.add(id);
    this.log.push(`block ${a.ip}`);
    return Promise.resolve();
  }
  release(id: string): Promise<void> {
    if (this.blocked.delete(id)) this.log.push('release');
    return Promise.resolve();
  }
  dropCriuLock(runId: string): Promise<void> {
    this.log.push(`drop CRIU-${runId}`);
    return Promise.resolve();
  }
  problem(a: ServiceAddress): Promise<string> {
    return Promise.resolve(this.present.has(a.ip) ? `${a.ip} is already on eth0 there` : '');
  }
  hookProblem(): string {
    return '';
  }
  hook(_hook: string, action: 'take' | 'return'): Promise<void> {
    this.log.push(`hook ${action}`);
    return this.hookFails ? Promise.reject(new Error('the hook failed')) : Promise.resolve();
  }
}

/** Page connections that carry nothing: the fake CRIU needs no pages. */
export const fakePageLinks: PageLinks = {
  listen: () =>
    Promise.resolve({
      port: 40_000,
      connection: Promise.resolve(new Socket()),
      close: () => undefined,
    }),
  connect: () => Promise.resolve({ done: Promise.resolve(0), close: () => undefined, handOver: () => -1 }),
};

/** A controller connection: progress is dropped; close() ends it as a lost controller would. */
export class FakeController {
  readonly certificate = undefined;
  readonly #listeners: ((reason: PeerGoneError) => void)[] = [];
  progress(): void {}
  onClose(listener: (reason: PeerGoneError) => void): void {
    this.#listeners.push(listener);
  }
  close(): void {
    for (const l of this.#listeners.splice(0)) l(new PeerGoneError('controller', 'closed by the test'));
  }
}

export interface FakeAgent {
  context: AgentContext;
  source: SourceRole;
  destination: DestinationRole;
  recovery: Recovery;
  criu: FakeCriu;
  peers: FakePeers;
  processes: FakeProcesses;
  addresses: FakeAddresses;
  journal: Journal;
  paused: PausePoint[];
  /** Each migration's final record, and whether its images were still there when it was written. */
  finals: { id: string; state: string; imagesLeft: boolean }[];
  cleanup(): void;
}

export function fakeAgent(options: { hooks?: Partial<TestHooks> } = {}): FakeAgent {
  const root = mkdtempSync(join(tmpdir(), 'ferry-fake-agent-'));
  const dataDir = join(root, 'data');
  const imagesRoot = join(root, 'images');
  mkdirSync(imagesRoot, { recursive: true });
  const finals: { id: string; state: string; imagesLeft: boolean }[] = [];
  const journal = new Journal(dataDir, (e) => finals.push({ id: e.id, state: e.state, imagesLeft: existsSync(e.dir) }));
  const processes = new FakeProcesses();
  const criu = new FakeCriu(processes, () => journal);
  const peers = new FakePeers();
  const addresses = new FakeAddresses();
  const paused: PausePoint[] = [];
  const hooks: TestHooks = {
    pause: async (point) => {
      paused.push(point);
      await options.hooks?.pause?.(point);
    },
    fault: (point, context) => (options.hooks?.fault ?? NO_TEST_HOOKS.fault)(point, context),
  };
  const context: AgentContext = {
    node: 'fake',
    advertise: '127.0.0.1',
    imagesRoot,
    dataDir,
    pageTls: undefined,
    criu,
    peers,
    processes,
    addresses,
    pages: fakePageLinks,
    journal,
    workloads: new Workloads(dataDir, 'fake'),
    migrations: new Migrations<LocalMigration>(dataDir),
    rates: new LearnedRates(dataDir),
    metrics: new AgentMetrics(),
    hooks,
    networkLock: 'nftables',
  };
  return {
    context,
    source: new SourceRole(context),
    destination: new DestinationRole(context, () => false),
    recovery: new Recovery(context),
    criu,
    peers,
    processes,
    addresses,
    journal,
    paused,
    finals,
    cleanup: () => rmSync(root, { recursive: true, force: true }),
  };
}
