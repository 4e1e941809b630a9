import {
  chmodSync,
  chownSync,
  constants,
  copyFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { availableParallelism } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { checkServerIdentity, type PeerCertificate } from 'node:tls';
import {
  CriuOperationError,
  CriuService,
  logReason,
  lazyPagesCopied,
  lazyPortFromLog,
  readDumpStats,
  resolveCriuBinary,
  startLazyPagesDaemon,
  type CriuClient,
  type DumpStats,
  type LazyPagesDaemon,
  type PageTls,
} from '../src/criu/index.js';
import { FerryError, InvalidInputError } from '../src/errors.js';
import { deferred } from '../src/deferred.js';
import { log } from '../src/log.js';
import { startTime, tcpListener } from '../src/proc.js';
import { PAGE_SIZE } from '../src/units.js';
import { pauseAt } from '../src/testpoints.js';
import type { Identity } from '../src/tls/index.js';
import {
  bodyName,
  WireConnection,
  WireServer,
  type Body,
  type BodyName,
  type BodyOf,
  type DumpStatsMessage,
  type EnvelopeMessage,
  type MigrationRecord,
  type WorkloadSpec,
} from '../src/wire/index.js';
import { faultAt } from './faults.js';
import { isFinal, Journal, sameProcess, tracerOf, type JournalEntry } from './journal.js';
import { ImageReceiver, imagesToStream, logAttributes, sha256Of, streamImages } from './images.js';
import { freeBytes, processFacts, takenPids } from './process.js';
import { probePostcopy, type PostcopySupport } from './postcopy.js';
import { AgentMetrics, type MetricsServer } from './metrics.js';
import { LearnedRates } from './rates.js';
import { Workloads } from './workloads.js';

export interface AgentOptions {
  name: string;
  host: string;
  port: number;
  /** Workload records and logs. */
  dataDir: string;
  /** Images, one directory per migration; tmpfs by default so nothing touches a disk. */
  imagesRoot?: string | undefined;
  /** The address page servers listen on and peers reach; default: host. Must be a numeric IP. */
  advertise?: string | undefined;
  criu?: string | undefined;
  softwareVersion: string;
  /**
   * Mutual TLS with this identity for every connection, and CRIU's TLS for
   * pages; undefined only under an explicit --insecure.
   */
  tls?: Identity | undefined;
  /**
   * The memory workloads may use here, when it is not the machine's: agents
   * sharing one kernel (lab hosts, containers) each report their own share.
   */
  capacityBytes?: number | undefined;
  /** Serve Prometheus metrics on this address (plain HTTP, read-only). */
  metrics?: { host: string; port: number } | undefined;
}

/**
 * What another agent may ask: the image stream of a migration and the
 * outcome a destination asks its source about. Everything else (dump,
 * restore, commit, run...) needs a controller's certificate, so one node's
 * stolen agent key cannot freeze or kill processes on the others.
 */
const AGENT_REQUESTS: readonly BodyName[] = ['imageChunk', 'imagesDone', 'outcomeQuery'];

/** The workload's log file, as it travels with a migration's images. */
const WORKLOAD_LOG = 'ferry-workload.log';
const WORKLOAD_LOG_STAT = 'ferry-workload.stat';

function sameContent(a: string, b: string): boolean {
  // A symlink where the log goes is replaced, not read through.
  return lstatSync(a).isFile() && statSync(a).size === statSync(b).size && sha256Of(a) === sha256Of(b);
}

class MigrationStateError extends FerryError {
  readonly code = 'MIGRATION_STATE';
}

/** A request the peer's certificate does not entitle it to. */
class NotAllowedError extends FerryError {
  readonly code = 'NOT_ALLOWED';
}

/** A step that failed here, with the logs CRIU wrote for it kept for reading. */
class StepFailedError extends FerryError {
  readonly code: string;
  constructor(cause: unknown, kept: { from: string; to: string | undefined }) {
    const original = cause instanceof Error ? cause.message : String(cause);
    // The images directory is gone; point at the kept copy of its logs instead.
    const message = kept.to === undefined ? original : original.split(kept.from).join(kept.to);
    const hint = cause instanceof FerryError ? cause.hint : undefined;
    const where = kept.to === undefined ? undefined : `CRIU's logs of this step are kept in ${kept.to}`;
    super(message, {
      hint: [hint, where].filter((h) => h !== undefined && !h.startsWith('read ')).join('; ') || undefined,
      cause,
    });
    this.code = cause instanceof FerryError ? cause.code : 'STEP_FAILED';
  }
}

/** A decision the agent waits for while CRIU holds a process (post-dump on the source, post-restore on the destination). */
interface Hold {
  release(go: boolean): void;
}

interface SourceMigration {
  role: 'source';
  id: string;
  dir: string;
  pid: number;
  workload: string | undefined;
  hold?: Hold;
  dump?: Promise<unknown>;
  finalRound?: string;
  leaseTimer?: NodeJS.Timeout;
  /** Set once the hold is being released, whichever way: the decision is taken once. */
  settling?: Promise<'committed' | 'aborted'>;
  /** Post-copy: the destination whose word ends or continues the stopped source. */
  lazy?: {
    destinationUrl: string;
    sent?: { files: number; bytes: number };
    streamMs?: number;
    /** Where CRIU serves the memory, once it does. */
    port?: number;
    /** The controller rolled back before the destination ran: continue without asking. */
    aborted?: boolean;
    committing?: boolean;
  };
}

interface DestinationMigration {
  role: 'destination';
  id: string;
  dir: string;
  workload: WorkloadSpec | undefined;
  receivers: Map<string, ImageReceiver>;
  /** CRIU's page servers for its rounds: each waits for one dump, and for ever if none comes. */
  pageServers: { pid: number; start: number | undefined }[];
  hold?: Hold;
  restore?: Promise<unknown>;
  restoreCancel?: AbortController;
  restoredPid?: number;
  leaseTimer?: NodeJS.Timeout;
  sourceUrl: string;
  holdMs: number;
  settling?: Promise<'resumed' | 'discarded'>;
  /** Post-copy: the daemon fetching the memory from the source, and how it ended. */
  lazy?: {
    daemon: LazyPagesDaemon;
    resumedAt?: number;
    result?: { ok: boolean; detail: string; ms: number; pages: number };
  };
}

type Migration = SourceMigration | DestinationMigration;

/**
 * The daemon on every node. It supervises the node's `criu service` and
 * plays the source or the destination of a migration on a controller's
 * requests. The invariant of the switchover is held here: the source's
 * process is killed only when the controller commits (after the
 * destination's copy exists, held before it runs), and the destination's
 * copy runs only when the controller says resume (after the commit).
 */
export class Agent {
  readonly #migrations = new Map<string, Migration>();
  readonly journal: Journal;
  readonly rates: LearnedRates;
  readonly metrics = new AgentMetrics();
  #metricsServer: MetricsServer | undefined;
  #postcopyProbe: Promise<PostcopySupport> | undefined;
  #recoveryTimer: NodeJS.Timeout | undefined;

  private constructor(
    readonly options: AgentOptions,
    readonly service: CriuService,
    readonly criu: CriuClient,
    readonly workloads: Workloads,
    readonly server: WireServer,
    readonly imagesRoot: string,
  ) {
    this.journal = new Journal(options.dataDir, (entry) =>
      this.metrics.migrations.inc({ role: entry.role, outcome: entry.state }),
    );
    this.rates = new LearnedRates(options.dataDir);
  }

  static async start(options: AgentOptions): Promise<Agent> {
    const imagesRoot =
      options.imagesRoot ?? join(existsSync('/dev/shm') ? '/dev/shm' : options.dataDir, 'ferry', options.name);
    mkdirSync(imagesRoot, { recursive: true, mode: 0o700 });
    mkdirSync(options.dataDir, { recursive: true, mode: 0o700 });
    let agent: Agent | undefined;
    const service = await CriuService.start({
      binary: resolveCriuBinary(options.criu),
      onStateChange: (e) => {
        log.info('criu service', { state: e.state, pid: e.pid, reason: e.reason });
        if (e.state === 'restarting') agent?.metrics.criuRestarts.inc();
      },
    });
    const workloads = new Workloads(options.dataDir, options.name);
    try {
      const server = await WireServer.listen({
        host: options.host,
        port: options.port,
        name: options.name,
        softwareVersion: options.softwareVersion,
        tls: options.tls,
        onConnection: (_, peer) =>
          log.info('connected', {
            role: peer.role,
            name: peer.name,
            address: peer.address,
            ...(peer.certificate === undefined
              ? { tls: false }
              : { certificate: peer.certificate.name, fingerprint: peer.certificate.fingerprint }),
          }),
        onRefused: (refusal) => log.warn('refused a connection', refusal),
        onRequest: (envelope, connection) => {
          if (agent === undefined) throw new MigrationStateError('the agent is still starting');
          const asked = bodyName(envelope);
          if (connection.certificate?.role === 'agent' && (asked === undefined || !AGENT_REQUESTS.includes(asked))) {
            throw new NotAllowedError(
              `${connection.certificate.name} holds an agent certificate, which may not ask for ${asked ?? 'that'}`,
            );
          }
          return agent.#handle(envelope, connection);
        },
      });
      agent = new Agent(options, service, service.client(), workloads, server, imagesRoot);
      if (options.metrics !== undefined) {
        agent.#metricsServer = await agent.metrics.serve(options.metrics.host, options.metrics.port);
        log.info('metrics', { url: `http://${urlHost(options.metrics.host)}:${agent.#metricsServer.port}/metrics` });
      }
      log.info('listening', { url: agent.url, criu: service.version?.text, images: imagesRoot });
      // Settle what a previous run of this agent left half-done.
      void agent.recover();
      return agent;
    } catch (error) {
      await service.stop();
      throw error;
    }
  }

  get url(): string {
    return `${this.options.tls === undefined ? 'ws' : 'wss'}://${urlHost(this.options.host)}:${this.server.port}`;
  }

  /** CRIU's TLS files for page transfer: the same identity the agent speaks with. */
  get #pageTls(): PageTls | undefined {
    const tls = this.options.tls;
    return tls === undefined ? undefined : { cacert: tls.files.ca, cert: tls.files.cert, key: tls.files.key };
  }

  get advertise(): string {
    return this.options.advertise ?? this.options.host;
  }

  async stop(): Promise<void> {
    if (this.#recoveryTimer !== undefined) clearTimeout(this.#recoveryTimer);
    for (const m of this.#migrations.values()) {
      if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
      m.hold?.release(false);
    }
    await this.server.close();
    await this.#metricsServer?.close();
    await this.service.stop();
  }

  async #handle(e: EnvelopeMessage, connection: WireConnection): Promise<Body> {
    if (e.factsQuery) return { facts: await this.#facts(e.factsQuery) };
    if (e.cpuCheck) return this.#cpuCheck(e.cpuCheck.cpuinfo ?? new Uint8Array());
    if (e.listWorkloads) return { workloadList: { workloads: this.workloads.list() } };
    if (e.nodeQuery) return { nodeFacts: this.#nodeFacts() };
    if (e.setDraining) {
      this.#setDraining(e.setDraining.draining === true);
      return { nodeFacts: this.#nodeFacts() };
    }
    if (e.runWorkload) {
      const w = await this.workloads.run(e.runWorkload.name ?? '', e.runWorkload.argv ?? [], {
        labels: e.runWorkload.labels ?? {},
        pinned: e.runWorkload.pinned === true,
      });
      log.info('workload started', { name: w.name, pid: w.pid });
      return { workload: { ...w, state: 'running', agent: this.options.name } };
    }
    if (e.prepareDestination) return this.#prepare(e.prepareDestination);
    if (e.pageServerStart) return this.#pageServer(e.pageServerStart);
    if (e.preDumpRound) return this.#preDump(e.preDumpRound, connection);
    if (e.finalDump) return this.#finalDump(e.finalDump, connection);
    if (e.imageChunk) return this.#imageChunk(e.imageChunk, connection);
    if (e.imagesDone) return this.#imagesDone(e.imagesDone, connection);
    if (e.restore) return this.#restore(e.restore, connection);
    if (e.commit) return this.#commit(e.commit.migrationId ?? '', e.commit.settled === true);
    if (e.resume) return this.#resume(e.resume.migrationId ?? '', e.resume.downtimeBeforeMs ?? 0);
    if (e.abort) return this.#abort(e.abort.migrationId ?? '', e.abort.reason ?? '');
    if (e.outcomeQuery) return { outcome: await this.#outcomeOf(e.outcomeQuery.migrationId ?? '') };
    if (e.recover) return { migrationList: { migrations: (await this.recover()).map(record) } };
    if (e.statusQuery) return { migrationList: { migrations: this.journal.list().map(record) } };
    throw new MigrationStateError('this request is not answered by an agent');
  }

  /**
   * Puts the workload's log where the process expects it. Only inside this
   * agent's own workloads directory (a path from the wire is never trusted
   * further), and a file already there with the same content is left alone:
   * on a shared file system it is the very file the frozen source holds,
   * and replacing it would cut the source's output off if it resumes.
   */
  #placeWorkloadLog(m: DestinationMigration, dir: string): void {
    const copy = join(dir, WORKLOAD_LOG);
    const wanted = m.workload?.logFile ?? '';
    if (!existsSync(copy) || !existsSync(join(dir, WORKLOAD_LOG_STAT)) || wanted === '') return;
    const home = resolve(this.options.dataDir, 'workloads');
    const target = resolve(wanted);
    if (dirname(target) !== home) {
      log.warn('a workload log outside this agent’s workloads directory is not placed', {
        migration: m.id,
        path: wanted,
      });
      return;
    }
    mkdirSync(home, { recursive: true });
    if (existsSync(target) && sameContent(target, copy)) return;
    const temporary = `${target}.${m.id}.tmp`;
    copyFileSync(copy, temporary, constants.COPYFILE_EXCL);
    const stat = logAttributes(join(dir, WORKLOAD_LOG_STAT));
    chmodSync(temporary, stat.mode);
    chownSync(temporary, stat.uid, stat.gid);
    renameSync(temporary, target);
  }

  get draining(): boolean {
    return existsSync(join(this.options.dataDir, 'draining'));
  }

  /** Kept on disk: a node being drained stays drained across agent restarts until undrained. */
  #setDraining(draining: boolean): void {
    const file = join(this.options.dataDir, 'draining');
    if (draining) writeFileSync(file, `${new Date().toISOString()}\n`);
    else rmSync(file, { force: true });
    log.info(draining ? 'draining: this node takes no workloads' : 'undrained: this node takes workloads again');
  }

  /** Memory, load and workloads, read now: cheap enough that a cache would only make it stale. */
  #nodeFacts(): BodyOf<'nodeFacts'> {
    const meminfo = readFileSync('/proc/meminfo', 'utf8');
    const kib = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(meminfo)?.[1] ?? 0) * 1024;
    const workloads = this.workloads.list().map((w) => ({ ...w, agent: this.options.name }));
    const capacity = this.options.capacityBytes;
    const used = workloads.reduce((sum, w) => sum + Number(w.residentBytes ?? 0), 0);
    return {
      name: this.options.name,
      memTotalBytes: capacity ?? kib('MemTotal'),
      memAvailableBytes: capacity === undefined ? kib('MemAvailable') : Math.max(0, capacity - used),
      load1: Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]) || 0,
      cpus: availableParallelism(),
      draining: this.draining,
      workloads,
      sampledAtMs: Date.now(),
    };
  }

  async #facts(q: BodyOf<'factsQuery'>): Promise<BodyOf<'facts'>> {
    const [version, features] = await Promise.all([this.criu.version(), this.criu.featureCheck()]);
    const scratch = await mkdtemp(join(this.imagesRoot, 'cpuinfo-'));
    let cpuinfo: Uint8Array;
    try {
      await this.criu.cpuinfoDump({ imagesDir: scratch });
      cpuinfo = readFileSync(join(scratch, 'cpuinfo.img'));
    } finally {
      await rm(scratch, { recursive: true, force: true });
    }
    let pid = q.pid ?? 0;
    let record = pid > 0 ? this.workloads.findByPid(pid) : undefined;
    if (q.workload) {
      record = this.workloads.find(q.workload);
      if (record === undefined) {
        throw new InvalidInputError(`no workload named ${q.workload} on ${this.options.name}`, {
          hint: `\`ferry ps --on ${this.options.name}\` lists them`,
        });
      }
      pid = record.pid;
    }
    const workload = {
      workload: record?.name ?? '',
      workloadArgv: record?.argv ?? [],
      workloadLogFile: record?.logFile ?? '',
      workloadStartedAtMs: record?.startedAtMs ?? 0,
      workloadLabels: record?.labels ?? {},
      workloadPinned: record?.pinned === true,
    };
    return {
      agentName: this.options.name,
      criuVersion: version.text,
      memTrack: features.memTrack,
      lazyPages: features.lazyPages,
      cpuinfo,
      imagesFreeBytes: freeBytes(this.imagesRoot),
      address: this.advertise,
      process: pid > 0 ? { ...processFacts(pid), ...workload } : null,
      takenPids: pid > 0 ? takenPids([pid]) : [],
      kernel: readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim(),
      restoreBytesPerMs: this.rates.get('restore'),
      pageWriteBytesPerMs: this.rates.get('pageWrite'),
      postcopy: q.probePostcopy === true ? await this.#postcopySupport() : null,
    };
  }

  /**
   * The post-copy probe's answer: a success is reused for ten minutes, a
   * failure is probed again next time (a fix on the node shows at once).
   */
  #postcopySupport(): Promise<PostcopySupport> {
    const last = this.#postcopyProbe;
    if (last !== undefined) return last;
    const probe = probePostcopy({
      criu: this.criu,
      criuBinary: this.service.binary.path,
      scratchRoot: this.imagesRoot,
      address: this.advertise,
      tls: this.#pageTls,
      nodeName: this.options.name,
    }).then((support) => {
      log.info(support.works ? 'post-copy probe: works' : 'post-copy probe: does not work', {
        reason: support.reason,
        ms: support.probeMs,
      });
      if (!support.works) this.#postcopyProbe = undefined;
      else setTimeout(() => (this.#postcopyProbe = undefined), 10 * 60_000).unref();
      return support;
    });
    this.#postcopyProbe = probe;
    probe.catch(() => (this.#postcopyProbe = undefined));
    return probe;
  }

  async #cpuCheck(cpuinfo: Uint8Array): Promise<Body> {
    const scratch = await mkdtemp(join(this.imagesRoot, 'cpucheck-'));
    try {
      writeFileSync(join(scratch, 'cpuinfo.img'), cpuinfo);
      await this.criu.cpuinfoCheck({ imagesDir: scratch });
      return { ack: {} };
    } catch (error) {
      if (error instanceof CriuOperationError) {
        throw unchanged(
          new InvalidInputError(`the source's CPU cannot run here (${this.options.name}): ${error.message}`, {
            hint: 'pick a destination with the same CPU features',
          }),
        );
      }
      throw error;
    } finally {
      await rm(scratch, { recursive: true, force: true });
    }
  }

  #prepare(p: BodyOf<'prepareDestination'>): Body {
    const id = p.migrationId ?? '';
    if (this.#migrations.has(id)) throw new MigrationStateError(`migration ${id} is already known here`);
    if (this.draining) {
      throw unchanged(
        new InvalidInputError(`${this.options.name} is draining and takes no workloads`, {
          hint: `pick another destination, or \`ferry undrain ${this.options.name}\` first`,
        }),
      );
    }
    const dir = join(this.imagesRoot, id);
    mkdirSync(dir, { mode: 0o700 });
    // Post-copy's final round has no page server to make its directory.
    if (p.postcopy === true) mkdirSync(join(dir, 'final'), { mode: 0o700 });
    this.#migrations.set(id, {
      role: 'destination',
      id,
      dir,
      workload: p.workload ?? undefined,
      receivers: new Map(),
      pageServers: [],
      sourceUrl: p.sourceUrl ?? '',
      holdMs: p.holdMs || 60_000,
    });
    this.journal.write({
      id,
      role: 'destination',
      state: 'prepared',
      dir,
      peerUrl: p.sourceUrl ?? '',
      workload: p.workload ?? undefined,
    });
    // A destination that hears nothing more asks the source in the end.
    this.#leaseDestination(this.#destination(id));
    log.info('destination prepared', { migration: id, dir });
    return { ack: {} };
  }

  async #pageServer(p: BodyOf<'pageServerStart'>): Promise<Body> {
    const m = this.#destination(p.migrationId ?? '');
    this.#strikeAt('destination.page-server');
    const dir = join(m.dir, p.round ?? '');
    mkdirSync(dir, { mode: 0o700 });
    const { port, pid } = await this.criu.pageServer({
      imagesDir: dir,
      address: this.advertise,
      parentImg: p.parent ? `../${p.parent}` : undefined,
      tls: p.plainPages === true ? undefined : this.#pageTls,
    });
    const server = pid > 0 ? pid : tcpListener(port, 'page-server');
    if (server !== undefined) m.pageServers.push({ pid: server, start: startTime(server) });
    log.info('page server started', { migration: m.id, round: p.round, port, pid: server });
    return { pageServerStarted: { address: this.advertise, port } };
  }

  async #preDump(p: BodyOf<'preDumpRound'>, connection: WireConnection): Promise<Body> {
    const m = this.#sourceFor(p.migrationId ?? '', p.pid ?? 0);
    const round = p.round ?? '';
    const dir = join(m.dir, round);
    mkdirSync(dir, { mode: 0o700 });
    const started = performance.now();
    connection.progress({ migrationId: m.id, phase: 'precopy', round, message: 'pre-dump', source: this.options.name });
    await this.criu.preDump({
      pid: m.pid,
      imagesDir: dir,
      parentImg: p.parent ? `../${p.parent}` : undefined,
      pageServer: {
        address: p.pageServerAddress ?? '',
        port: p.pageServerPort ?? 0,
        tls: p.plainPages === true ? undefined : this.#pageTls,
      },
    });
    const stats = await readDumpStats(dir);
    this.rates.learn('pageWrite', stats.pagesWritten * PAGE_SIZE, stats.memwriteTimeUs / 1000);
    this.metrics.phaseSeconds.observe({ phase: 'predump' }, (performance.now() - started) / 1000);
    this.metrics.pagesSent.inc(stats.pagesWritten);
    this.metrics.bytesSent.inc(stats.pagesWritten * PAGE_SIZE);
    return { roundDone: { stats: statsMessage(stats), durationMs: Math.round(performance.now() - started) } };
  }

  /**
   * The final dump: CRIU freezes the process, sends its pages to the
   * destination's page server and writes the rest here; at post-dump the
   * answer is held (the process stays frozen) while the images are streamed
   * to the destination. The reply goes out while still holding; commit or
   * abort decides. Without either within the hold time, or when the
   * controller's connection drops, the answer is "no": the process resumes.
   */
  async #finalDump(p: BodyOf<'finalDump'>, connection: WireConnection): Promise<Body> {
    const m = this.#sourceFor(p.migrationId ?? '', p.pid ?? 0);
    const round = p.round ?? 'final';
    const dir = join(m.dir, round);
    mkdirSync(dir, { mode: 0o700 });
    m.finalRound = round;
    this.journal.write({
      id: m.id,
      role: 'source',
      state: 'dumping',
      pid: m.pid,
      pidStart: startTime(m.pid),
      dir: m.dir,
      peerUrl: p.destinationUrl ?? '',
      workload: m.workload === undefined ? undefined : { name: m.workload },
    });
    let frozenAt = 0;
    const reachedHold = deferred<BodyOf<'dumpHeld'>>();
    const progress = (message: string, extra: { bytes?: number } = {}): void =>
      connection.progress({
        migrationId: m.id,
        phase: 'switchover',
        round,
        message,
        source: this.options.name,
        ...extra,
      });
    if (p.postcopy === true) return this.#finalDumpLazy(m, p, dir, round, connection, progress);

    m.dump = this.criu
      .dump({
        pid: m.pid,
        imagesDir: dir,
        parentImg: p.parent ? `../${p.parent}` : undefined,
        pageServer: {
          address: p.pageServerAddress ?? '',
          port: p.pageServerPort ?? 0,
          tls: p.plainPages === true ? undefined : this.#pageTls,
        },
        // After pre-copy rounds, dirty tracking lets the final dump skip what the rounds already sent.
        trackMem: p.parent ? true : undefined,
        timeoutMs: 0, // the lease below bounds the hold; CRIU's own work is bounded by the controller
        onNotify: async (event) => {
          if (event.script === 'pre-dump') {
            frozenAt = performance.now();
            progress('freezing and dumping');
          }
          if (event.script === 'query-ext-files') this.#strikeAt('source.frozen');
          if (event.script !== 'post-dump') return true;
          const { sent, streamStarted } = await this.#streamFinal(m, dir, round, p.destinationUrl ?? '', progress);
          this.metrics.phaseSeconds.observe({ phase: 'dump' }, (streamStarted - frozenAt) / 1000);
          const decision = deferred<boolean>();
          m.hold = { release: decision.resolve };
          this.journal.update(m.id, { state: 'held' });
          await pauseAt('source.after-hold');
          m.leaseTimer = setTimeout(() => {
            log.warn('no commit within the hold time: resuming the source', { migration: m.id });
            void this.#settleSource(m, false);
          }, p.holdMs || 60_000);
          // Without a controller there will be no commit: resume now rather than at lease end.
          connection.onClose(() => void this.#settleSource(m, false));
          reachedHold.resolve({
            imageFiles: sent.files,
            imageBytes: sent.bytes,
            frozenMs: Math.round(performance.now() - frozenAt),
            streamMs: Math.round(performance.now() - streamStarted),
          });
          return decision.promise;
        },
      })
      .catch((error: unknown) => {
        reachedHold.reject(error);
        throw error;
      });
    m.dump.catch(() => undefined);
    try {
      return { dumpHeld: await reachedHold.promise };
    } catch (error) {
      // CRIU has already resumed the process (a failed dump thaws it).
      this.journal.update(m.id, { state: 'aborted', action: 'the dump failed; the process resumed' });
      throw unchanged(new StepFailedError(error, { from: m.dir, to: this.#forget(m, true) }));
    }
  }

  /**
   * Streams the final dump's images (and the workload's log) to the
   * destination while the process is frozen.
   */
  async #streamFinal(
    m: SourceMigration,
    dir: string,
    round: string,
    destinationUrl: string,
    progress: (message: string, extra?: { bytes?: number }) => void,
  ): Promise<{ sent: { files: number; bytes: number }; streamStarted: number }> {
    progress('dump written; streaming images to the destination');
    const streamStarted = performance.now();
    // Post-copy: the pages CRIU does not serve lazily (not anonymous private memory) are written here.
    const names = imagesToStream(dir, { pages: m.lazy !== undefined });
    // The workload's log is a file it holds open, so CRIU needs it on the destination, at its size
    // now (frozen): it travels with the images and the destination puts it in place.
    const logFile = m.workload === undefined ? undefined : this.workloads.find(m.workload)?.logFile;
    if (logFile !== undefined && logFile !== '' && existsSync(logFile)) {
      // CRIU checks the file's size, mode and owner on restore: all three travel.
      const { mode, uid, gid } = statSync(logFile);
      copyFileSync(logFile, join(dir, WORKLOAD_LOG));
      writeFileSync(join(dir, WORKLOAD_LOG_STAT), JSON.stringify({ mode: mode & 0o7777, uid, gid }));
      names.push(WORKLOAD_LOG, WORKLOAD_LOG_STAT);
    }
    const peer = await this.#connectPeer(destinationUrl, 'destination');
    let sent;
    try {
      sent = await streamImages(peer, { migrationId: m.id, round }, dir, names);
    } finally {
      peer.close();
    }
    progress(`streamed ${sent.files} image files`, { bytes: sent.bytes });
    this.metrics.phaseSeconds.observe({ phase: 'stream' }, (performance.now() - streamStarted) / 1000);
    this.metrics.bytesSent.inc(sent.bytes);
    return { sent, streamStarted };
  }

  /**
   * The post-copy final dump: CRIU freezes the process, writes everything
   * but its memory, then serves the memory on a port until the
   * destination's lazy-pages daemon has fetched it all. The answer goes out
   * once the server listens. CRIU leaves the process stopped when the
   * transfer ends (leave_stopped): it is killed only when the destination
   * confirms every page arrived, and continued otherwise. A transfer that
   * fails makes CRIU resume it at once.
   */
  async #finalDumpLazy(
    m: SourceMigration,
    p: BodyOf<'finalDump'>,
    dir: string,
    round: string,
    connection: WireConnection,
    progress: (message: string, extra?: { bytes?: number }) => void,
  ): Promise<Body> {
    let frozenAt = 0;
    const serving = deferred<BodyOf<'dumpHeld'>>();
    m.lazy = { destinationUrl: p.destinationUrl ?? '' };
    m.dump = this.criu
      .dump({
        pid: m.pid,
        imagesDir: dir,
        parentImg: p.parent ? `../${p.parent}` : undefined,
        trackMem: p.parent ? true : undefined,
        lazyPages: { port: 0, tls: p.plainPages === true ? undefined : this.#pageTls },
        leaveStopped: true,
        timeoutMs: 0,
        onNotify: async (event) => {
          if (event.script === 'pre-dump') {
            frozenAt = performance.now();
            progress('freezing and dumping all but the memory');
          }
          if (event.script === 'query-ext-files') this.#strikeAt('source.frozen');
          if (event.script === 'post-dump') {
            const { sent, streamStarted } = await this.#streamFinal(m, dir, round, p.destinationUrl ?? '', progress);
            this.metrics.phaseSeconds.observe({ phase: 'dump' }, (streamStarted - frozenAt) / 1000);
            m.lazy!.sent = sent;
            m.lazy!.streamMs = Math.round(performance.now() - streamStarted);
          }
          if (event.script === 'status-ready') {
            const port = lazyPortFromLog(join(dir, 'dump.log'));
            if (port === undefined) throw new Error('CRIU did not log its lazy page server’s port');
            m.lazy!.port = port;
            this.journal.update(m.id, { state: 'held', action: `serving memory on port ${port}` });
            progress(`serving memory to the destination on port ${port}`);
            serving.resolve({
              imageFiles: m.lazy?.sent?.files ?? 0,
              imageBytes: m.lazy?.sent?.bytes ?? 0,
              frozenMs: Math.round(performance.now() - frozenAt),
              streamMs: m.lazy?.streamMs ?? 0,
              postcopyPort: port,
            });
          }
          return true;
        },
      })
      .catch((error: unknown) => {
        serving.reject(error);
        throw error;
      });
    m.dump.catch(() => undefined);
    // The transfer's end decides the source copy, whether or not a controller is still there.
    m.settling = this.#settleLazySource(m);
    try {
      const held = await serving.promise;
      // Until the commit a lease holds: no commit in time, or no controller any more, and the source rolls back.
      const rollBack = (why: string): void => {
        if (m.lazy?.committing === true || m.lazy?.aborted === true) return;
        log.warn(why, { migration: m.id });
        void this.#abandonLazy(m);
      };
      m.leaseTimer = setTimeout(
        () => rollBack('no commit within the hold time: resuming the source'),
        p.holdMs || 60_000,
      );
      connection.onClose(() => rollBack('the controller went away before the commit: resuming the source'));
      return { dumpHeld: held };
    } catch (error) {
      await m.settling;
      throw unchanged(new StepFailedError(error, { from: m.dir, to: this.#forget(m, true) }));
    }
  }

  /**
   * The end of a post-copy source. CRIU's transfer failing resumes the
   * process (CRIU does it); a transfer that ended leaves it stopped, and
   * only the destination's word ends it: "committed" once every page
   * arrived there, "aborted" once its copy is gone. Without an answer the
   * process stays stopped and the source keeps asking: ending it on a guess
   * could lose the process, continuing it could run it twice.
   */
  async #settleLazySource(m: SourceMigration): Promise<'committed' | 'aborted'> {
    const lazy = m.lazy!;
    try {
      await m.dump;
    } catch (error) {
      this.journal.update(m.id, {
        state: 'aborted',
        action: `the memory transfer failed (${(error as Error).message.slice(0, 200)}); CRIU resumed the process here`,
      });
      log.warn('post-copy transfer failed: the source process resumed', { migration: m.id });
      this.#forget(m, true);
      return 'aborted';
    }
    for (;;) {
      const outcome = lazy.aborted ? 'aborted' : await this.#askPeer(m.id, lazy.destinationUrl, 'destination');
      if (outcome === 'committed' || outcome === 'aborted' || outcome === 'unknown') {
        const go = outcome === 'committed';
        this.journal.update(m.id, { state: go ? 'committing' : 'aborted' });
        try {
          process.kill(m.pid, go ? 'SIGKILL' : 'SIGCONT');
        } catch {
          // gone already
        }
        if (go) {
          this.journal.update(m.id, { state: 'committed' });
          if (m.workload !== undefined) this.workloads.forget(m.workload);
          log.info('post-copy done: every page arrived; source process ended', { migration: m.id, pid: m.pid });
          this.#forget(m);
          return 'committed';
        }
        this.journal.update(m.id, {
          state: 'aborted',
          action: 'the destination has no copy; the process resumed here',
        });
        log.info('post-copy abandoned: source process continued', { migration: m.id, pid: m.pid });
        this.#forget(m, true);
        return 'aborted';
      }
      await sleep(1_000);
    }
  }

  /**
   * Releases the source's hold, once. "Yes" is journalled as committing
   * before CRIU hears it: from then on the source never resumes (CRIU ends
   * it); a crash before CRIU hears it makes CRIU resume the process, which
   * recovery sees (the process exists) and records as aborted.
   */
  #settleSource(m: SourceMigration, go: boolean): Promise<'committed' | 'aborted'> {
    m.settling ??= (async () => {
      if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
      if (go) {
        this.journal.update(m.id, { state: 'committing' });
        await pauseAt('source.before-commit-answer');
        m.hold?.release(true);
        await m.dump;
        this.journal.update(m.id, { state: 'committed' });
        await pauseAt('source.after-commit');
        if (m.workload !== undefined) this.workloads.forget(m.workload);
        log.info('committed: source process ended', { migration: m.id, pid: m.pid });
        return 'committed';
      }
      m.hold?.release(false); // CRIU thaws the process
      await m.dump?.catch(() => undefined);
      this.journal.update(m.id, { state: 'aborted', action: 'the process resumed on the source' });
      this.#forget(m, true);
      log.info('aborted: source process resumed', { migration: m.id, pid: m.pid });
      return 'aborted';
    })();
    return m.settling;
  }

  async #imageChunk(c: BodyOf<'imageChunk'>, connection: WireConnection): Promise<Body> {
    const m = this.#destination(c.migrationId ?? '');
    this.#fromSource(m, connection);
    if (Number(c.offset ?? 0) === 0) await pauseAt('destination.during-images');
    this.#receiver(m, c.round ?? '').write(c.name ?? '', Number(c.offset ?? 0), c.data ?? new Uint8Array());
    return { ack: {} };
  }

  #imagesDone(d: BodyOf<'imagesDone'>, connection: WireConnection): Body {
    const m = this.#destination(d.migrationId ?? '');
    this.#fromSource(m, connection);
    const victim = d.files?.find((f) => Number(f.size ?? 0) > 0)?.name;
    if (faultAt('destination.images-done') === 'corrupt' && victim) {
      const file = join(m.dir, d.round ?? '', victim);
      const bytes = readFileSync(file);
      bytes[0] = (bytes[0] ?? 0) ^ 0xff;
      writeFileSync(file, bytes);
    }
    const { files, bytes } = this.#receiver(m, d.round ?? '').verify(d.files ?? []);
    log.info('images received', { migration: m.id, files, bytes });
    return { ack: {} };
  }

  /** Restores and holds at post-restore: the copy exists, stopped, and runs only on resume. */
  async #restore(r: BodyOf<'restore'>, connection: WireConnection): Promise<Body> {
    const m = this.#destination(r.migrationId ?? '');
    const dir = join(m.dir, r.round ?? '');
    if (faultAt('destination.before-restore') === 'break-images') rmSync(join(dir, 'pstree.img'), { force: true });
    this.#placeWorkloadLog(m, dir);
    const started = performance.now();
    connection.progress({ migrationId: m.id, phase: 'switchover', message: 'restoring', source: this.options.name });
    const reachedHold = deferred<number>();
    if (r.postcopyPort) {
      // Post-copy: the daemon that will fetch the memory listens before the restore hands it the process.
      const daemon = startLazyPagesDaemon({
        binary: this.service.binary.path,
        imagesDir: dir,
        address: r.postcopyAddress ?? '',
        port: r.postcopyPort,
        tls: r.plainPages === true ? undefined : this.#pageTls,
      });
      m.lazy = { daemon };
      try {
        await daemon.ready;
      } catch (error) {
        daemon.kill();
        this.journal.update(m.id, { state: 'discarded', action: 'the lazy-pages daemon did not start' });
        throw new StepFailedError(error, { from: m.dir, to: this.#forget(m, true) });
      }
    }
    m.restoreCancel = new AbortController();
    m.restore = this.criu
      .restore({
        imagesDir: dir,
        lazyPages: m.lazy !== undefined ? true : undefined,
        signal: m.restoreCancel.signal,
        timeoutMs: 0,
        onNotify: async (event) => {
          if (event.script !== 'post-restore') return true;
          m.restoredPid = event.pid;
          const decision = deferred<boolean>();
          m.hold = { release: decision.resolve };
          this.journal.update(m.id, { state: 'restored', pid: event.pid, pidStart: startTime(event.pid ?? 0) });
          await pauseAt('destination.after-restore-held');
          this.#leaseDestination(m);
          reachedHold.resolve(event.pid ?? 0);
          return decision.promise;
        },
      })
      .catch((error: unknown) => {
        reachedHold.reject(error);
        throw error;
      });
    m.restore.catch(() => undefined);
    try {
      const pid = await reachedHold.promise;
      const restoreMs = Math.round(performance.now() - started);
      const bytes = pageImageBytes(m.dir);
      this.metrics.phaseSeconds.observe({ phase: 'restore' }, restoreMs / 1000);
      this.rates.learn('restore', bytes, restoreMs);
      return { restored: { pid, restoreMs, pageImageBytes: bytes } };
    } catch (error) {
      // Before any commit: nothing to keep.
      m.lazy?.daemon.kill();
      this.journal.update(m.id, { state: 'discarded', action: 'the restore failed' });
      throw new StepFailedError(error, { from: m.dir, to: this.#forget(m, true) });
    }
  }

  /** Waits for resume; when it does not come in time, asks the source what happened. */
  #leaseDestination(m: DestinationMigration): void {
    if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
    m.leaseTimer = setTimeout(() => void this.#decideFromSource(m), m.holdMs);
  }

  async #decideFromSource(m: DestinationMigration): Promise<void> {
    const outcome = await this.#askPeer(m.id, m.sourceUrl, 'source');
    log.warn('no resume within the hold time; the source says', { migration: m.id, outcome });
    if (outcome === 'committed') await this.#settleDestination(m, true);
    else if (outcome === 'aborted' || outcome === 'unknown') await this.#settleDestination(m, false);
    else this.#leaseDestination(m); // undecided or unreachable: keep holding, ask again later
  }

  /**
   * Releases the destination's hold, once. Resume only after the source
   * committed (the controller's Resume, or the source's own answer): the
   * destination never runs before the commit.
   */
  #settleDestination(m: DestinationMigration, go: boolean): Promise<'resumed' | 'discarded'> {
    m.settling ??= (async () => {
      if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
      if (go) {
        this.journal.update(m.id, { state: 'resuming' });
        await pauseAt('destination.before-resume-answer');
        m.hold?.release(true);
        await m.restore;
        const pid = m.restoredPid ?? 0;
        if (m.workload !== undefined) this.workloads.adopt(m.workload, pid);
        if (m.lazy !== undefined) {
          this.#awaitLazyPages(m, pid);
          return 'resumed';
        }
        this.journal.update(m.id, { state: 'resumed', pid, pidStart: startTime(pid) });
        this.#forget(m);
        log.info('resumed', { migration: m.id, pid });
        return 'resumed';
      }
      m.restoreCancel?.abort(); // CRIU kills the half-restored copy
      if (m.lazy !== undefined) {
        m.lazy.result ??= { ok: false, detail: 'the copy here was discarded before it ran', ms: 0, pages: 0 };
        m.lazy.daemon.kill();
      }
      await m.restore?.catch(() => undefined);
      this.journal.update(m.id, { state: 'discarded', action: 'the restored copy was discarded' });
      this.#forget(m, true);
      return 'discarded';
    })();
    return m.settling;
  }

  /**
   * Post-copy after the resume: the copy runs here while the daemon fetches
   * the rest of its memory. When it has all of it, the migration is done;
   * when it ends without (the source or the link lost), the copy here has
   * holes in its memory and must not run on: it is killed, and the source
   * hears that it has no copy here.
   */
  #awaitLazyPages(m: DestinationMigration, pid: number): void {
    const lazy = m.lazy!;
    lazy.resumedAt = performance.now();
    this.journal.update(m.id, { state: 'resuming', pid, pidStart: startTime(pid), action: 'fetching memory' });
    void lazy.daemon.exited.then(async ({ code, signal }) => {
      const ms = Math.round(performance.now() - (lazy.resumedAt ?? 0));
      const logPath = join(m.dir, 'final', 'lazy-pages.log');
      if (code === 0) {
        lazy.result = { ok: true, detail: 'every page arrived', ms, pages: lazyPagesCopied(logPath) };
        this.metrics.pagesSent.inc(lazy.result.pages);
        this.journal.update(m.id, { state: 'resumed', pid, pidStart: startTime(pid), action: '' });
        log.info('post-copy: every page arrived', { migration: m.id, pid, ms });
      } else {
        const why = `criu lazy-pages ended with ${signal ?? `exit code ${code}`}: ${(await logReason(logPath)) ?? 'no error logged'}`;
        lazy.result = { ok: false, detail: why, ms, pages: lazyPagesCopied(logPath) };
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone already
        }
        if (m.workload?.name) this.workloads.forget(m.workload.name);
        this.journal.update(m.id, { state: 'discarded', action: `post-copy failed, the copy here was killed: ${why}` });
        log.error('post-copy failed: the copy here was killed', { migration: m.id, pid, reason: why });
      }
      // Kept for a while: the source and the controller ask how it ended.
      setTimeout(() => this.#forget(m, !lazy.result?.ok), 60_000).unref();
    });
  }

  async #commit(id: string, settled: boolean): Promise<Body> {
    const m = this.#migrations.get(id);
    if (m?.role === 'source' && m.lazy !== undefined) return this.#commitLazy(m, settled);
    if (settled) {
      const entry = this.journal.read(id);
      // A post-copy source that settled before this question came: its images are gone, its journal says.
      if (entry?.role === 'source' && entry.state === 'committed') return { committed: {} };
      if (entry?.role === 'source' && entry.state === 'aborted') {
        throw new MigrationStateError(`migration ${id} ended without its copy: ${entry.action ?? 'aborted'}`);
      }
    }
    if (m?.role !== 'source' || m.hold === undefined || m.dump === undefined) {
      throw new MigrationStateError(`migration ${id} is not held here, nothing to commit`);
    }
    if ((await this.#settleSource(m, true)) !== 'committed') {
      throw new MigrationStateError(`migration ${id} was already rolled back here: the process runs on the source`);
    }
    const stats = await readDumpStats(join(m.dir, m.finalRound ?? 'final'));
    this.rates.learn('pageWrite', stats.pagesWritten * PAGE_SIZE, stats.memwriteTimeUs / 1000);
    this.metrics.pagesSent.inc(stats.pagesWritten);
    this.metrics.bytesSent.inc(stats.pagesWritten * PAGE_SIZE);
    this.#forget(m);
    return { committed: { stats: statsMessage(stats) } };
  }

  /**
   * Post-copy commit, in two steps: first (before the destination runs) the
   * source promises never to continue the process on its own say; then,
   * with settled, the answer waits until the destination has every page
   * and the source copy has ended.
   */
  async #commitLazy(m: SourceMigration, settled: boolean): Promise<Body> {
    const lazy = m.lazy!;
    if (lazy.aborted) throw new MigrationStateError(`migration ${m.id} was already rolled back here`);
    if (!settled) {
      if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
      lazy.committing = true;
      this.journal.update(m.id, { state: 'committing', action: 'the destination runs; serving its memory' });
      return { committed: {} };
    }
    const outcome = await m.settling;
    if (outcome !== 'committed') {
      throw new MigrationStateError(
        `migration ${m.id} did not complete: ${this.journal.read(m.id)?.action ?? outcome}`,
      );
    }
    // No statistics: CRIU 4.1 resets them when its lazy page server starts (the destination counts the pages).
    return { committed: {} };
  }

  async #resume(id: string, downtimeBeforeMs: number): Promise<Body> {
    const started = performance.now();
    const m = this.#migrations.get(id);
    if (m?.role !== 'destination' || m.hold === undefined || m.restore === undefined) {
      const entry = this.journal.read(id);
      if (entry?.state === 'resumed') return { resumed: { pid: entry.pid ?? 0 } };
      throw new MigrationStateError(`migration ${id} has no held copy here, nothing to resume`);
    }
    if ((await this.#settleDestination(m, true)) !== 'resumed') {
      throw new MigrationStateError(`migration ${id}'s copy was already discarded here`);
    }
    if (downtimeBeforeMs > 0) {
      this.metrics.downtimeSeconds.observe((downtimeBeforeMs + performance.now() - started) / 1000);
    }
    return { resumed: { pid: m.restoredPid ?? 0 } };
  }

  /** Rolls back whatever this agent holds for the migration. */
  async #abort(id: string, reason: string): Promise<Body> {
    const m = this.#migrations.get(id);
    if (m === undefined) return { ack: {} };
    log.warn('aborting', { migration: id, role: m.role, reason });
    if (m.role === 'source' && m.lazy !== undefined) {
      if (m.lazy.committing) throw new MigrationStateError(`migration ${id} is already committed here`);
      await this.#abandonLazy(m);
    } else if (m.role === 'source') {
      if ((await this.#settleSource(m, false)) === 'committed') {
        throw new MigrationStateError(`migration ${id} is already committed here`);
      }
    } else {
      await this.#settleDestination(m, false);
    }
    return { ack: {} };
  }

  /**
   * Rolls a post-copy source back before its commit: the process continues
   * here. CRIU's lazy server is told to stop (#stopServing); if it is still
   * serving a destination that does not let go, its worker is killed, which
   * releases the process as well.
   */
  async #abandonLazy(m: SourceMigration): Promise<void> {
    m.lazy!.aborted = true;
    if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
    await this.#stopServing(m);
    const settled = await Promise.race([m.settling, sleep(10_000).then(() => undefined)]);
    if (settled !== undefined) return;
    const worker = criuWorkerIn(this.service.pid, join(m.dir, m.finalRound ?? 'final'));
    log.warn('the lazy page server did not stop: ending its CRIU worker', { migration: m.id, worker });
    if (worker !== undefined) process.kill(worker, 'SIGKILL');
    await m.settling;
  }

  /**
   * A lazy dump serves one connection and waits for it as long as it takes:
   * with no destination coming, a connection that ends at once ends the
   * wait (CRIU then resumes the process, or leaves it stopped for
   * #settleLazySource to continue it).
   */
  async #stopServing(m: SourceMigration): Promise<void> {
    const port = m.lazy?.port;
    if (port === undefined) return;
    await new Promise<void>((done) => {
      const socket = createConnection({ host: this.advertise, port }, () => socket.end());
      socket.on('error', () => done());
      socket.on('close', () => done());
    });
  }

  /** Outcome answers; a post-copy destination answers for itself, with how long its fetch took. */
  async #outcomeOf(id: string): Promise<BodyOf<'outcome'>> {
    const m = this.#migrations.get(id);
    if (m?.role === 'destination' && m.lazy !== undefined) {
      const result = m.lazy.result;
      if (result === undefined) return { state: 'pending' };
      return {
        state: result.ok ? 'committed' : 'aborted',
        detail: result.detail,
        postcopyMs: result.ms,
        postcopyPages: result.pages,
      };
    }
    if (m === undefined) {
      const entry = this.journal.read(id);
      if (entry?.role === 'destination') {
        if (entry.state === 'resumed') return { state: 'committed' };
        if (entry.state === 'discarded') return { state: 'aborted', detail: entry.action ?? '' };
        // Not settled here yet (a restart in between): a copy may run, so never "no copy".
        return { state: 'pending' };
      }
    }
    return { state: await this.#outcome(id) };
  }

  /** The source's answer to "did it commit?": from the journal, and from the process itself after a restart. */
  async #outcome(id: string): Promise<'committed' | 'aborted' | 'pending' | 'unknown'> {
    const m = this.#migrations.get(id);
    if (m?.role === 'source' && m.lazy !== undefined) {
      return m.lazy.committing ? 'committed' : m.lazy.aborted ? 'aborted' : 'pending';
    }
    if (m?.role === 'source') return m.settling === undefined ? 'pending' : await m.settling;
    const entry = this.journal.read(id);
    if (entry === undefined || entry.role !== 'source') return 'unknown';
    if (entry.state === 'committed' || entry.state === 'aborted') return entry.state;
    return (await this.#recoverSource(entry)).state as 'committed' | 'aborted';
  }

  /**
   * Settles every migration this agent's journal has left half-done: at
   * start (after a crash) and on `ferry recover`. Destinations that cannot
   * reach their source yet are retried every few seconds.
   */
  async recover(): Promise<JournalEntry[]> {
    const settled: JournalEntry[] = [];
    let retry = false;
    for (const entry of this.journal.list()) {
      if (isFinal(entry) || this.#migrations.has(entry.id)) continue;
      try {
        const after =
          entry.role === 'source' ? await this.#recoverSource(entry) : await this.#recoverDestination(entry);
        if (!isFinal(after)) retry = true;
        settled.push(after);
      } catch (error) {
        log.error('recovery failed', { migration: entry.id, error: (error as Error).message });
        retry = true;
      }
    }
    this.#cleanOrphanImages();
    if (retry && this.#recoveryTimer === undefined) {
      this.#recoveryTimer = setTimeout(() => {
        this.#recoveryTimer = undefined;
        void this.recover();
      }, 2_000);
      this.#recoveryTimer.unref();
    }
    return settled;
  }

  /** A source record left by a crash: the process's existence says how CRIU ended it. */
  async #recoverSource(entry: JournalEntry): Promise<JournalEntry> {
    // CRIU may still be finishing (thawing or killing) the tree it held.
    for (let i = 0; i < 300 && entry.pid !== undefined && tracerOf(entry.pid) !== 0; i++) await sleep(50);
    const alive = sameProcess(entry.pid, entry.pidStart);
    const committed = entry.state === 'committing' && !alive;
    if (committed && entry.workload?.name) this.workloads.forget(entry.workload.name);
    rmSync(entry.dir, { recursive: true, force: true });
    const after = this.journal.write({
      ...entry,
      state: committed ? 'committed' : 'aborted',
      action: committed
        ? 'recovered: the source copy had ended after the commit'
        : alive
          ? 'recovered: the process runs on the source'
          : 'recovered: the process was gone before any commit',
    });
    log.warn('recovered a source migration', { migration: entry.id, state: after.state, action: after.action });
    return after;
  }

  /** A destination record left by a crash: the source decides; the images are kept until then. */
  async #recoverDestination(entry: JournalEntry): Promise<JournalEntry> {
    const outcome = await this.#askPeer(entry.id, entry.peerUrl, 'source');
    if (outcome === 'pending' || outcome === 'unreachable') return entry;
    if (outcome === 'committed') {
      let pid = entry.pid;
      let action = 'recovered: the restored copy was already running';
      if (!(sameProcess(entry.pid, entry.pidStart) && tracerOf(entry.pid ?? 0) === 0 && entry.state === 'resuming')) {
        // The held copy died with the old agent (CRIU kills it): restore it again from the kept images.
        pid = (await this.criu.restore({ imagesDir: join(entry.dir, 'final') })).pid;
        action = 'recovered: restored from the kept images after the commit';
      }
      if (entry.workload?.name) this.workloads.adopt(entry.workload, pid ?? 0);
      rmSync(entry.dir, { recursive: true, force: true });
      const after = this.journal.write({ ...entry, state: 'resumed', pid, pidStart: startTime(pid ?? 0), action });
      log.warn('recovered a destination migration', { migration: entry.id, action });
      return after;
    }
    if (sameProcess(entry.pid, entry.pidStart) && entry.state !== 'resuming') process.kill(entry.pid ?? 0, 'SIGKILL');
    rmSync(entry.dir, { recursive: true, force: true });
    return this.journal.write({ ...entry, state: 'discarded', action: `recovered: the source says ${outcome}` });
  }

  /** A connection to the other agent of a migration, introduced as an agent. */
  #connectPeer(url: string, role: 'source' | 'destination', timeoutMs?: number): Promise<WireConnection> {
    return WireConnection.connect(
      url,
      { role: 'agent', name: this.options.name, softwareVersion: this.options.softwareVersion },
      { peer: `${role} ${url}`, timeoutMs, tls: this.options.tls },
    );
  }

  async #askPeer(
    id: string,
    url: string,
    role: 'source' | 'destination',
  ): Promise<'committed' | 'aborted' | 'pending' | 'unknown' | 'unreachable'> {
    try {
      const source = await this.#connectPeer(url, role, 3_000);
      try {
        const state = (await source.request({ outcomeQuery: { migrationId: id } }, 'outcome', { timeoutMs: 30_000 }))
          .state;
        return state === 'committed' || state === 'aborted' || state === 'pending' ? state : 'unknown';
      } finally {
        source.close();
      }
    } catch (error) {
      log.warn(`cannot ask the ${role} for the outcome`, { migration: id, url, error: (error as Error).message });
      return 'unreachable';
    }
  }

  /**
   * A test fault that only this agent can inflict on itself
   * (FERRY_TEST_FAULT="point=action", agent/faults.ts); inert without the
   * variable. Crashes and network cuts are done from outside, at the pause
   * points of src/testpoints.ts.
   */
  #strikeAt(point: string): void {
    const action = faultAt(point);
    if (action === 'fill-images') {
      // Leave 16 KiB free where the page server will write. Only on a small
      // file system (the test mounts one): filling a RAM-backed tmpfs of the
      // machine's size would starve the machine instead.
      const free = freeBytes(this.imagesRoot);
      if (free > 1024 * 1024 * 1024) throw new Error(`refusing to fill ${this.imagesRoot}: ${free} bytes free`);
      execFileSync('fallocate', ['-l', String(Math.max(0, free - 16 * 1024)), join(this.imagesRoot, 'ballast')]);
    } else if (action === 'kill-criu-worker') {
      // The CRIU worker doing this agent's dump: a child of the service master.
      const children = readFileSync(`/proc/${this.service.pid}/task/${this.service.pid}/children`, 'utf8').trim();
      for (const pid of children.split(/\s+/).filter(Boolean)) process.kill(Number(pid), 'SIGKILL');
    }
  }

  /** Image directories no journal entry accounts for (a crash before the first record). */
  #cleanOrphanImages(): void {
    const known = new Set([
      ...this.journal
        .list()
        .filter((e) => !isFinal(e))
        .map((e) => e.id),
      ...this.#migrations.keys(),
    ]);
    for (const name of readdirSync(this.imagesRoot)) {
      if (/^m-/.test(name) && !known.has(name)) rmSync(join(this.imagesRoot, name), { recursive: true, force: true });
    }
  }

  #sourceFor(id: string, pid: number): SourceMigration {
    const existing = this.#migrations.get(id);
    if (existing !== undefined) {
      if (existing.role !== 'source' || existing.pid !== pid)
        throw new MigrationStateError(`migration ${id} is not this one`);
      return existing;
    }
    if (!processFacts(pid).exists)
      throw unchanged(new InvalidInputError(`no process with PID ${pid} on ${this.options.name}`));
    const dir = join(this.imagesRoot, id);
    mkdirSync(dir, { mode: 0o700 });
    const m: SourceMigration = { role: 'source', id, dir, pid, workload: this.workloads.findByPid(pid)?.name };
    this.#migrations.set(id, m);
    return m;
  }

  /**
   * Another agent may stream a migration's images only if it is that
   * migration's source: its certificate names the host of the source URL the
   * controller gave (and checked when it connected there). Without this, any
   * node's agent key could write the images a process is restored from here.
   */
  #fromSource(m: DestinationMigration, connection: WireConnection): void {
    const peer = connection.certificate;
    if (peer?.role !== 'agent') return;
    const host = URL.canParse(m.sourceUrl) ? new URL(m.sourceUrl).hostname.replace(/^\[|\]$/g, '') : '';
    const certificate = { subject: { CN: peer.name }, subjectaltname: peer.subjectAltName } as PeerCertificate;
    if (host === '' || checkServerIdentity(host, certificate) !== undefined) {
      throw new NotAllowedError(`${peer.name} is not the source of migration ${m.id}, whose images it sent`);
    }
  }

  #destination(id: string): DestinationMigration {
    const m = this.#migrations.get(id);
    if (m?.role !== 'destination') throw new MigrationStateError(`migration ${id} was not prepared here`);
    return m;
  }

  #receiver(m: DestinationMigration, round: string): ImageReceiver {
    let receiver = m.receivers.get(round);
    if (receiver === undefined) {
      const dir = join(m.dir, round);
      if (!existsSync(dir)) throw new MigrationStateError(`round ${round} of ${m.id} has no page server here`);
      receiver = new ImageReceiver(dir);
      m.receivers.set(round, receiver);
    }
    return receiver;
  }

  /** Drops the migration and its images; after a failure, CRIU's logs are kept in DATA/failed/ID (returned). */
  #forget(m: Migration, keepLogs = false): string | undefined {
    if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
    this.#migrations.delete(m.id);
    // A page server no dump came to would wait for ever; one that served its dump has ended.
    // The start time tells a page server still there from a process that took its PID since.
    for (const server of m.role === 'destination' ? m.pageServers : []) {
      if (server.start === undefined || startTime(server.pid) !== server.start) continue;
      try {
        process.kill(server.pid, 'SIGKILL');
      } catch {
        // ended meanwhile
      }
    }
    let kept: string | undefined;
    if (keepLogs && existsSync(m.dir)) {
      kept = join(this.options.dataDir, 'failed', m.id);
      for (const round of readdirSync(m.dir)) {
        const roundDir = join(m.dir, round);
        if (!statSync(roundDir).isDirectory()) continue;
        for (const name of readdirSync(roundDir).filter((n) => n.endsWith('.log'))) {
          mkdirSync(join(kept, round), { recursive: true });
          copyFileSync(join(roundDir, name), join(kept, round, name));
        }
      }
    }
    rmSync(m.dir, { recursive: true, force: true });
    return kept;
  }
}

function statsMessage(s: DumpStats): DumpStatsMessage {
  return {
    pagesScanned: s.pagesScanned,
    pagesSkippedParent: s.pagesSkippedParent,
    pagesWritten: s.pagesWritten,
    frozenTimeUs: s.frozenTimeUs,
    memdumpTimeUs: s.memdumpTimeUs,
    memwriteTimeUs: s.memwriteTimeUs,
    freezingTimeUs: s.freezingTimeUs,
    pagesLazy: s.pagesLazy,
  };
}

/** Marks an error as one that changed nothing (the process runs on where it was). */
function unchanged(error: unknown): unknown {
  if (error instanceof Error) Object.assign(error, { unchanged: true });
  return error;
}

function pageImageBytes(dir: string): number {
  let total = 0;
  for (const round of readdirSync(dir)) {
    const roundDir = join(dir, round);
    if (!statSync(roundDir).isDirectory()) continue;
    for (const name of readdirSync(roundDir)) {
      if (/^pages-\d+\.img$/.test(name)) total += statSync(join(roundDir, name)).size;
    }
  }
  return total;
}

function urlHost(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

function record(e: JournalEntry): MigrationRecord {
  return {
    migrationId: e.id,
    role: e.role,
    state: e.state,
    pid: e.pid ?? 0,
    peerUrl: e.peerUrl,
    updatedAtMs: e.updatedAtMs,
    action: e.action ?? '',
  };
}

/** The CRIU service's worker working in dir (CRIU works in the images directory), if any. */
function criuWorkerIn(servicePid: number | undefined, dir: string): number | undefined {
  if (servicePid === undefined) return undefined;
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === servicePid && readlinkSync(`/proc/${name}/cwd`) === dir) return Number(name);
    } catch {
      // gone meanwhile
    }
  }
  return undefined;
}
