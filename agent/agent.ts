import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import {
  CriuOperationError,
  CriuService,
  readDumpStats,
  resolveCriuBinary,
  type CriuClient,
  type DumpStats,
} from '../src/criu/index.js';
import { FerryError, InvalidInputError } from '../src/errors.js';
import { log } from '../src/log.js';
import {
  WireConnection,
  WireServer,
  type Body,
  type BodyOf,
  type DumpStatsMessage,
  type EnvelopeMessage,
  type WorkloadSpec,
} from '../src/wire/index.js';
import { faultAt } from './faults.js';
import { ImageReceiver, imagesToStream, streamImages } from './images.js';
import { freeBytes, processFacts, takenPids } from './process.js';
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
}

class MigrationStateError extends FerryError {
  readonly code = 'MIGRATION_STATE';
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
}

interface DestinationMigration {
  role: 'destination';
  id: string;
  dir: string;
  workload: WorkloadSpec | undefined;
  receivers: Map<string, ImageReceiver>;
  hold?: Hold;
  restore?: Promise<unknown>;
  restoreCancel?: AbortController;
  restoredPid?: number;
  leaseTimer?: NodeJS.Timeout;
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

  private constructor(
    readonly options: AgentOptions,
    readonly service: CriuService,
    readonly criu: CriuClient,
    readonly workloads: Workloads,
    readonly server: WireServer,
    readonly imagesRoot: string,
  ) {}

  static async start(options: AgentOptions): Promise<Agent> {
    const imagesRoot =
      options.imagesRoot ?? join(existsSync('/dev/shm') ? '/dev/shm' : options.dataDir, 'ferry', options.name);
    mkdirSync(imagesRoot, { recursive: true, mode: 0o700 });
    mkdirSync(options.dataDir, { recursive: true, mode: 0o700 });
    const service = await CriuService.start({
      binary: resolveCriuBinary(options.criu),
      onStateChange: (e) => log.info('criu service', { state: e.state, pid: e.pid, reason: e.reason }),
    });
    const workloads = new Workloads(options.dataDir, options.name);
    let agent: Agent | undefined;
    try {
      const server = await WireServer.listen({
        host: options.host,
        port: options.port,
        name: options.name,
        softwareVersion: options.softwareVersion,
        onConnection: (_, peer) => log.info('connected', peer),
        onRequest: (envelope, connection) => {
          if (agent === undefined) throw new MigrationStateError('the agent is still starting');
          return agent.#handle(envelope, connection);
        },
      });
      agent = new Agent(options, service, service.client(), workloads, server, imagesRoot);
      log.info('listening', { url: agent.url, criu: service.version?.text, images: imagesRoot });
      return agent;
    } catch (error) {
      await service.stop();
      throw error;
    }
  }

  get url(): string {
    return `ws://${urlHost(this.options.host)}:${this.server.port}`;
  }

  get advertise(): string {
    return this.options.advertise ?? this.options.host;
  }

  async stop(): Promise<void> {
    for (const m of this.#migrations.values()) {
      if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
      m.hold?.release(false);
    }
    await this.server.close();
    await this.service.stop();
  }

  async #handle(e: EnvelopeMessage, connection: WireConnection): Promise<Body> {
    if (e.factsQuery) return { facts: await this.#facts(e.factsQuery) };
    if (e.cpuCheck) return this.#cpuCheck(e.cpuCheck.cpuinfo ?? new Uint8Array());
    if (e.listWorkloads) return { workloadList: { workloads: this.workloads.list() } };
    if (e.runWorkload) {
      const w = await this.workloads.run(e.runWorkload.name ?? '', e.runWorkload.argv ?? []);
      log.info('workload started', { name: w.name, pid: w.pid });
      return { workload: { ...w, state: 'running', agent: this.options.name } };
    }
    if (e.prepareDestination) return this.#prepare(e.prepareDestination);
    if (e.pageServerStart) return this.#pageServer(e.pageServerStart);
    if (e.preDumpRound) return this.#preDump(e.preDumpRound, connection);
    if (e.finalDump) return this.#finalDump(e.finalDump, connection);
    if (e.imageChunk) return this.#imageChunk(e.imageChunk);
    if (e.imagesDone) return this.#imagesDone(e.imagesDone);
    if (e.restore) return this.#restore(e.restore, connection);
    if (e.commit) return this.#commit(e.commit.migrationId ?? '');
    if (e.resume) return this.#resume(e.resume.migrationId ?? '');
    if (e.abort) return this.#abort(e.abort.migrationId ?? '', e.abort.reason ?? '');
    throw new MigrationStateError('this request is not answered by an agent');
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
    };
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
    const dir = join(this.imagesRoot, id);
    mkdirSync(dir, { mode: 0o700 });
    this.#migrations.set(id, {
      role: 'destination',
      id,
      dir,
      workload: p.workload ?? undefined,
      receivers: new Map(),
    });
    log.info('destination prepared', { migration: id, dir });
    return { ack: {} };
  }

  async #pageServer(p: BodyOf<'pageServerStart'>): Promise<Body> {
    const m = this.#destination(p.migrationId ?? '');
    const dir = join(m.dir, p.round ?? '');
    mkdirSync(dir, { mode: 0o700 });
    const { port } = await this.criu.pageServer({
      imagesDir: dir,
      address: this.advertise,
      parentImg: p.parent ? `../${p.parent}` : undefined,
    });
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
      pageServer: { address: p.pageServerAddress ?? '', port: p.pageServerPort ?? 0 },
    });
    const stats = await readDumpStats(dir);
    return { roundDone: { stats: statsMessage(stats), durationMs: Math.round(performance.now() - started) } };
  }

  /**
   * The final dump: CRIU freezes the process, sends its pages to the
   * destination's page server and writes the rest here; at post-dump the
   * answer is held (the process stays frozen) while the images are streamed
   * to the destination. The reply goes out while still holding; commit or
   * abort decides, and a lease answers "no" (resume) if neither comes.
   */
  async #finalDump(p: BodyOf<'finalDump'>, connection: WireConnection): Promise<Body> {
    const m = this.#sourceFor(p.migrationId ?? '', p.pid ?? 0);
    const round = p.round ?? 'final';
    const dir = join(m.dir, round);
    mkdirSync(dir, { mode: 0o700 });
    m.finalRound = round;
    let frozenAt = 0;
    let held: (value: BodyOf<'dumpHeld'>) => void = () => undefined;
    let failedBeforeHold: (error: unknown) => void = () => undefined;
    const reachedHold = new Promise<BodyOf<'dumpHeld'>>((resolve, reject) => {
      held = resolve;
      failedBeforeHold = reject;
    });
    const progress = (message: string, extra: { bytes?: number } = {}): void =>
      connection.progress({
        migrationId: m.id,
        phase: 'switchover',
        round,
        message,
        source: this.options.name,
        ...extra,
      });

    m.dump = this.criu
      .dump({
        pid: m.pid,
        imagesDir: dir,
        parentImg: p.parent ? `../${p.parent}` : undefined,
        pageServer: { address: p.pageServerAddress ?? '', port: p.pageServerPort ?? 0 },
        // After pre-copy rounds, dirty tracking lets the final dump skip what the rounds already sent.
        trackMem: p.parent ? true : undefined,
        timeoutMs: 0, // the lease below bounds the hold; CRIU's own work is bounded by the controller
        onNotify: async (event) => {
          if (event.script === 'pre-dump') {
            frozenAt = performance.now();
            progress('freezing and dumping');
          }
          if (event.script !== 'post-dump') return true;
          progress('dump written; streaming images to the destination');
          const streamStarted = performance.now();
          const names = imagesToStream(dir);
          const peer = await WireConnection.connect(
            p.destinationUrl ?? '',
            { role: 'agent', name: this.options.name, softwareVersion: this.options.softwareVersion },
            { peer: `destination ${p.destinationUrl}` },
          );
          let sent;
          try {
            sent = await streamImages(peer, { migrationId: m.id, round }, dir, names);
          } finally {
            peer.close();
          }
          progress(`streamed ${sent.files} image files`, { bytes: sent.bytes });
          const decision = new Promise<boolean>((resolve) => {
            m.hold = { release: resolve };
          });
          m.leaseTimer = setTimeout(() => {
            log.warn('no commit within the hold time: resuming the source', { migration: m.id });
            m.hold?.release(false);
          }, p.holdMs || 60_000);
          // Without a controller there will be no commit: resume now rather than at lease end.
          connection.onClose(() => m.hold?.release(false));
          held({
            imageFiles: sent.files,
            imageBytes: sent.bytes,
            frozenMs: Math.round(performance.now() - frozenAt),
            streamMs: Math.round(performance.now() - streamStarted),
          });
          return decision;
        },
      })
      .catch((error: unknown) => {
        failedBeforeHold(error);
        throw error;
      });
    m.dump.catch(() => undefined);
    try {
      return { dumpHeld: await reachedHold };
    } catch (error) {
      // CRIU has already resumed the process (a failed dump thaws it).
      throw unchanged(new StepFailedError(error, { from: m.dir, to: this.#forget(m, true) }));
    }
  }

  #imageChunk(c: BodyOf<'imageChunk'>): Body {
    const m = this.#destination(c.migrationId ?? '');
    this.#receiver(m, c.round ?? '').write(c.name ?? '', Number(c.offset ?? 0), c.data ?? new Uint8Array());
    return { ack: {} };
  }

  #imagesDone(d: BodyOf<'imagesDone'>): Body {
    const m = this.#destination(d.migrationId ?? '');
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
    const started = performance.now();
    connection.progress({ migrationId: m.id, phase: 'switchover', message: 'restoring', source: this.options.name });
    let restored: (pid: number) => void = () => undefined;
    let failed: (error: unknown) => void = () => undefined;
    const reachedHold = new Promise<number>((resolve, reject) => {
      restored = resolve;
      failed = reject;
    });
    m.restoreCancel = new AbortController();
    m.restore = this.criu
      .restore({
        imagesDir: dir,
        signal: m.restoreCancel.signal,
        timeoutMs: 0,
        onNotify: (event) => {
          if (event.script !== 'post-restore') return true;
          m.restoredPid = event.pid;
          const decision = new Promise<boolean>((resolve) => {
            m.hold = { release: resolve };
          });
          m.leaseTimer = setTimeout(() => {
            log.warn('no resume within the hold time: discarding the restored copy', { migration: m.id });
            m.restoreCancel?.abort();
          }, r.holdMs || 60_000);
          restored(event.pid ?? 0);
          return decision;
        },
      })
      .catch((error: unknown) => {
        failed(error);
        throw error;
      });
    m.restore.catch(() => undefined);
    try {
      const pid = await reachedHold;
      return {
        restored: {
          pid,
          restoreMs: Math.round(performance.now() - started),
          pageImageBytes: pageImageBytes(m.dir),
        },
      };
    } catch (error) {
      throw new StepFailedError(error, { from: m.dir, to: this.#forget(m, true) });
    }
  }

  async #commit(id: string): Promise<Body> {
    const m = this.#migrations.get(id);
    if (m?.role !== 'source' || m.hold === undefined || m.dump === undefined) {
      throw new MigrationStateError(`migration ${id} is not held here, nothing to commit`);
    }
    // Past this point the source never resumes: CRIU kills it on "yes".
    if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
    m.hold.release(true);
    await m.dump;
    const stats = await readDumpStats(join(m.dir, m.finalRound ?? 'final'));
    if (m.workload !== undefined) this.workloads.forget(m.workload);
    this.#forget(m);
    log.info('committed: source process ended', { migration: id, pid: m.pid });
    return { committed: { stats: statsMessage(stats) } };
  }

  async #resume(id: string): Promise<Body> {
    const m = this.#migrations.get(id);
    if (m?.role !== 'destination' || m.hold === undefined || m.restore === undefined) {
      throw new MigrationStateError(`migration ${id} has no held copy here, nothing to resume`);
    }
    if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
    m.hold.release(true);
    await m.restore;
    const pid = m.restoredPid ?? 0;
    if (m.workload !== undefined) this.workloads.adopt(m.workload, pid);
    this.#forget(m);
    log.info('resumed', { migration: id, pid });
    return { resumed: { pid } };
  }

  /** Rolls back whatever this agent holds for the migration. */
  async #abort(id: string, reason: string): Promise<Body> {
    const m = this.#migrations.get(id);
    if (m === undefined) return { ack: {} };
    log.warn('aborting', { migration: id, role: m.role, reason });
    if (m.leaseTimer !== undefined) clearTimeout(m.leaseTimer);
    if (m.role === 'source') {
      m.hold?.release(false); // CRIU thaws the process
      await m.dump?.catch(() => undefined);
    } else {
      m.restoreCancel?.abort(); // CRIU kills the half-restored copy
      await m.restore?.catch(() => undefined);
    }
    this.#forget(m, true);
    return { ack: {} };
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
