import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { DumpStats } from '../../src/criu/index.js';
import { deferred } from '../../src/deferred.js';
import { InvalidInputError } from '../../src/errors.js';
import { log } from '../../src/log.js';
import { PAGE_SIZE } from '../../src/units.js';
import {
  DEFAULT_HOLD_MS,
  type BodyOf,
  type DumpStatsMessage,
  type ReplyOf,
  type WireConnection,
} from '../../src/wire/index.js';
import { pageTlsFor, type AgentContext } from '../context.js';
import { MigrationStateError, StepFailedError, unchanged } from '../errors.js';
import { dropCriuLock, letGo, movingAddress, takeBack } from '../address-move.js';
import { AHEAD_ROUND, carriedRoots, packAhead } from '../carry.js';
import { streamImages } from '../images.js';
import { Hold } from '../hold.js';
import type { PageStream } from '../page-stream.js';
import { isSource, type SourceMigration } from './migration.js';
import { SourcePostcopyRole } from './postcopy.js';
import { streamFinal, type Progress } from './stream.js';

/** The controller's connection, as the source role uses it: progress out, and its end. */
export type ControllerLink = Pick<WireConnection, 'progress' | 'onClose'>;

/**
 * The source of a migration: pre-copy rounds while the process runs, the
 * final dump that holds it frozen, and the commit or rollback of that hold.
 *
 * The invariant's source half is held here: the process ends only by the
 * hold's "yes", which only a Commit gives and which is journalled as
 * committing before CRIU hears it; every other way out of the hold (abort,
 * lease end, lost controller, a failed dump, the agent stopping) resumes
 * the process where it was.
 */
export class SourceRole {
  readonly postcopy: SourcePostcopyRole;

  constructor(private readonly context: AgentContext) {
    this.postcopy = new SourcePostcopyRole(context);
  }

  /** A pre-copy round: memory copied to the destination's page server while the process runs. */
  async preDump(p: BodyOf<'preDumpRound'>, connection: ControllerLink): Promise<ReplyOf<'preDumpRound'>> {
    const { criu, migrations, metrics, rates } = this.context;
    const m = this.#migration(p.migrationId ?? '', p.pid ?? 0);
    const round = p.round ?? '';
    const dir = join(m.dir, round);
    mkdirSync(dir, { mode: 0o700 });
    const started = performance.now();
    connection.progress({ migrationId: m.id, phase: 'precopy', round, message: 'pre-dump', source: this.context.node });
    const pages = await this.#pageStream(m, p);
    try {
      await migrations.track(
        m,
        criu.preDump({
          ...this.#round(m, dir, p, pages),
          signal: m.abort.signal,
        }),
      );
    } finally {
      pages.close();
    }
    m.idleSince = performance.now();
    const stats = await criu.dumpStats(dir);
    rates.learn('pageWrite', stats.pagesWritten * PAGE_SIZE, stats.memwriteTimeUs / 1000);
    metrics.phaseSeconds.observe({ phase: 'predump' }, (performance.now() - started) / 1000);
    metrics.pagesSent.inc(stats.pagesWritten);
    metrics.bytesSent.inc(stats.pagesWritten * PAGE_SIZE);
    return { stats: statsMessage(stats), durationMs: Math.round(performance.now() - started) };
  }

  /**
   * Before the freeze: the files the workload carries go to the destination
   * whole, while the process runs, so that the final dump sends only what
   * changed since (agent/carry.ts).
   */
  async carryAhead(p: BodyOf<'carryAhead'>, connection: ControllerLink): Promise<ReplyOf<'carryAhead'>> {
    const m = this.#migration(p.migrationId ?? '', p.pid ?? 0);
    const record = m.workload === undefined ? undefined : this.context.workloads.find(m.workload);
    if (record === undefined) return { files: 0, bytes: 0, durationMs: 0 };
    const started = performance.now();
    const dir = join(m.dir, AHEAD_ROUND);
    mkdirSync(dir, { mode: 0o700 });
    const { names, files } = packAhead(dir, carriedRoots(this.context.dataDir, record));
    const peer = await this.context.peers.connect(p.destinationUrl ?? '', 'destination');
    let sent;
    try {
      sent = await this.context.migrations.track(
        m,
        streamImages(peer, { migrationId: m.id, round: AHEAD_ROUND }, dir, names, m.abort.signal),
      );
    } finally {
      peer.close();
    }
    m.ahead = files;
    m.idleSince = performance.now();
    const durationMs = Math.round(performance.now() - started);
    connection.progress({
      migrationId: m.id,
      phase: 'switchover',
      message: `carried ${sent.files} file${sent.files === 1 ? '' : 's'} ahead of the freeze, in ${durationMs} ms`,
      source: this.context.node,
      bytes: sent.bytes,
    });
    this.context.metrics.bytesSent.inc(sent.bytes);
    return { files: sent.files, bytes: sent.bytes, durationMs };
  }

  /**
   * The final dump: CRIU freezes the process, sends its pages to the
   * destination's page server and writes the rest here; at post-dump the
   * answer is held (the process stays frozen) while the images are streamed
   * to the destination. The reply goes out while still holding; commit or
   * abort decides. Without either within the hold time, or when the
   * controller's connection drops, the answer is "no": the process resumes.
   */
  async finalDump(p: BodyOf<'finalDump'>, connection: ControllerLink): Promise<ReplyOf<'finalDump'>> {
    const { criu, hooks, journal, metrics, migrations } = this.context;
    const m = this.#migration(p.migrationId ?? '', p.pid ?? 0);
    const round = p.round ?? 'final';
    const dir = join(m.dir, round);
    mkdirSync(dir, { mode: 0o700 });
    m.finalRound = round;
    journal.begin({
      id: m.id,
      role: 'source',
      state: 'dumping',
      postcopy: p.postcopy === true ? true : undefined,
      pid: m.pid,
      pidStart: this.context.processes.startTime(m.pid),
      dir: m.dir,
      peerUrl: p.destinationUrl ?? '',
      workload: m.workload === undefined ? undefined : { name: m.workload },
    });
    const progress: Progress = (message, extra = {}) =>
      connection.progress({
        migrationId: m.id,
        phase: 'switchover',
        round,
        message,
        source: this.context.node,
        ...extra,
      });
    const record = m.workload === undefined ? undefined : this.context.workloads.find(m.workload);
    m.address = movingAddress(record);
    const peer = p.destinationUrl ?? '';
    const socketOptions = heldState(this.context, m, p);
    m.criuLock = socketOptions.networkLock === 'nftables';
    if (p.postcopy === true) return this.postcopy.finalDump(m, p, round, connection, progress, socketOptions);

    let pages: PageStream;
    try {
      pages = await this.#pageStream(m, p);
    } catch (error) {
      // Nothing was frozen: the process runs on as it was.
      journal.advance(m.id, 'aborted', { action: 'no page connection to the destination; the process runs on' });
      throw unchanged(new StepFailedError(error, { from: m.dir, to: await migrations.forget(m, true) }));
    }
    let frozenAt = 0;
    const reachedHold = deferred<ReplyOf<'finalDump'>>();
    const answer = deferred<boolean>();
    const hold = this.#hold(m, answer, peer);
    m.dump = migrations.track(
      m,
      criu
        .dump({
          ...this.#round(m, dir, p, pages),
          ...socketOptions,
          // After pre-copy rounds, dirty tracking lets the final dump skip what the rounds already sent.
          trackMem: p.parent ? true : undefined,
          timeoutMs: 0, // the lease below bounds the hold; CRIU's own work is bounded by the controller
          signal: m.abort.signal,
          onNotify: async (event) => {
            if (event.script === 'pre-dump') {
              frozenAt = performance.now();
              progress('freezing and dumping');
            }
            if (event.script === 'query-ext-files') {
              hooks.fault('source.frozen', { criuServicePid: criu.servicePid, imagesDir: dir });
            }
            if (event.script !== 'post-dump') return true;
            if (m.address !== undefined) {
              await letGo(this.context, m.id, m.address);
              progress(`address ${m.address.address.cidr} withdrawn`);
            }
            const { sent, streamStarted } = await streamFinal(this.context, m, round, p.destinationUrl ?? '', progress);
            metrics.phaseSeconds.observe({ phase: 'dump' }, (streamStarted - frozenAt) / 1000);
            m.hold = hold;
            journal.advance(m.id, 'held');
            await hooks.pause('source.after-hold');
            hold.lease(p.holdMs || DEFAULT_HOLD_MS, () => {
              log.warn('no commit within the hold time: resuming the source', { migration: m.id });
              void hold.decide('no', 'no commit within the hold time');
            });
            // Without a controller there will be no commit: resume now rather than at lease end.
            hold.whileConnected(connection, () => void hold.decide('no', 'the controller went away'));
            reachedHold.resolve({
              imageFiles: sent.files,
              imageBytes: sent.bytes,
              frozenMs: Math.round(performance.now() - frozenAt),
              streamMs: Math.round(performance.now() - streamStarted),
            });
            return answer.promise;
          },
        })
        .catch((error: unknown) => {
          reachedHold.reject(error);
          throw error;
        })
        .finally(() => pages.close()),
    );
    m.dump.catch(() => undefined);
    try {
      return await reachedHold.promise;
    } catch (error) {
      // CRIU has already resumed the process (a failed or cancelled dump thaws it).
      if (m.address !== undefined) await takeBack(this.context, m.id, m.address, peer);
      journal.advance(m.id, 'aborted', { action: 'the dump failed; the process resumed' });
      throw unchanged(new StepFailedError(error, { from: m.dir, to: await migrations.forget(m, true) }));
    }
  }

  /**
   * The hold of a frozen source. "Yes" is journalled as committing before
   * CRIU hears it: from then on the source never resumes (CRIU ends it); a
   * crash before CRIU hears it makes CRIU resume the process, which
   * recovery sees (the process exists) and records as aborted.
   */
  #hold(m: SourceMigration, answer: { resolve(go: boolean): void }, peer: string): Hold {
    const { hooks, journal, migrations, workloads } = this.context;
    return new Hold(
      { migrationId: m.id, role: 'source', signal: m.abort.signal },
      {
        record: (decision, why) => {
          if (decision === 'yes') journal.advance(m.id, 'committing');
          else journal.note(m.id, { action: `rolling back: ${why}` });
        },
        release: async (decision, why) => {
          if (decision === 'yes') {
            await hooks.pause('source.before-commit-answer');
            answer.resolve(true);
            await m.dump;
            await dropCriuLock(this.context, m);
            journal.advance(m.id, 'committed');
            await hooks.pause('source.after-commit');
            if (m.workload !== undefined) workloads.forget(m.workload);
            log.info('committed: source process ended', { migration: m.id, pid: m.pid });
            return;
          }
          // The address first: the process resumes with it.
          if (m.address !== undefined) await takeBack(this.context, m.id, m.address, peer);
          answer.resolve(false); // CRIU thaws the process
          await m.dump?.catch(() => undefined);
          await migrations.forget(m, true);
          journal.advance(m.id, 'aborted', { action: `the process resumed on the source (${why})` });
          log.info('aborted: source process resumed', { migration: m.id, pid: m.pid });
        },
      },
    );
  }

  /** Commit: the hold's "yes". After it the process never resumes here. */
  async commit(p: BodyOf<'commit'>): Promise<ReplyOf<'commit'>> {
    const { criu, journal, metrics, migrations, rates } = this.context;
    const id = p.migrationId ?? '';
    const m = migrations.get(id);
    if (isSource(m) && m.postcopy !== undefined) return this.postcopy.commit(m, p.settled === true);
    if (p.settled === true) {
      const entry = journal.read(id);
      // A post-copy source that settled before this question came: its images are gone, its journal says.
      if (entry?.role === 'source' && entry.state === 'committed') return {};
      if (entry?.role === 'source' && entry.state === 'aborted') {
        throw new MigrationStateError(`migration ${id} ended without its copy: ${entry.action ?? 'aborted'}`);
      }
    }
    if (!isSource(m) || m.hold === undefined || m.dump === undefined) {
      throw new MigrationStateError(`migration ${id} is not held here, nothing to commit`);
    }
    if ((await m.hold.decide('yes', 'commit')) !== 'yes') {
      throw new MigrationStateError(`migration ${id} was already rolled back here: the process runs on the source`);
    }
    const stats = await criu.dumpStats(join(m.dir, m.finalRound ?? 'final'));
    rates.learn('pageWrite', stats.pagesWritten * PAGE_SIZE, stats.memwriteTimeUs / 1000);
    metrics.pagesSent.inc(stats.pagesWritten);
    metrics.bytesSent.inc(stats.pagesWritten * PAGE_SIZE);
    await migrations.forget(m);
    return { stats: statsMessage(stats) };
  }

  /**
   * Rolls the source back: a held process hears "no"; CRIU calls still in
   * flight (a pre-dump, a dump not yet at its hold) are cancelled, which
   * leaves the process running, and only then are the images removed.
   */
  async abort(m: SourceMigration, reason: string): Promise<void> {
    if (m.postcopy !== undefined) return this.postcopy.abort(m, reason);
    if (m.hold !== undefined) {
      if ((await m.hold.decide('no', `aborted: ${reason}`)) === 'yes') {
        throw new MigrationStateError(`migration ${m.id} is already committed here`);
      }
      return;
    }
    await this.context.migrations.cancel(m, new MigrationStateError(`aborted: ${reason}`));
    if (m.hold !== undefined) {
      // The dump reached its hold while being cancelled: the cancelled call answered CRIU for it.
      await (m.hold as Hold).decide('no', `aborted: ${reason}`);
      return;
    }
    this.context.journal.advance(m.id, 'aborted', { action: 'the process resumed on the source' });
    await this.context.migrations.forget(m, true);
    log.info('aborted: source process resumed', { migration: m.id, pid: m.pid });
  }

  /** The source's own answer to "did it commit?", while the migration is in progress here. */
  async outcome(m: SourceMigration): Promise<'committed' | 'aborted' | 'pending'> {
    if (m.postcopy !== undefined) return this.postcopy.outcome(m);
    const decision = m.hold?.decision;
    if (decision === undefined) {
      // Never frozen: only rounds or carried files so far, and nothing under way. A controller quiet for
      // longer than a hold is gone (it does not wait between steps): the migration ended here.
      if (m.hold === undefined && m.work.size === 0 && performance.now() - m.idleSince > DEFAULT_HOLD_MS) {
        log.warn('no word from the controller since its last step: the migration is abandoned', { migration: m.id });
        await this.context.migrations.forget(m);
        return 'aborted';
      }
      return 'pending';
    }
    return (await decision) === 'yes' ? 'committed' : 'aborted';
  }

  /** What a round's dump sends where: the process, its images here and its parent, the page stream. */
  #round(m: SourceMigration, dir: string, p: BodyOf<'preDumpRound'> | BodyOf<'finalDump'>, pages: PageStream) {
    return {
      pid: m.pid,
      imagesDir: dir,
      parentImg: p.parent ? `../${p.parent}` : undefined,
      pageServer: { socket: pages.handOver() },
    };
  }

  /** The round's page stream: this agent's connection to the destination's page port, CRIU's end of it. */
  #pageStream(m: SourceMigration, p: BodyOf<'preDumpRound'> | BodyOf<'finalDump'>): Promise<PageStream> {
    return this.context.pages.connect(
      p.pageServerAddress ?? '',
      p.pageServerPort ?? 0,
      pageTlsFor(this.context, p.plainPages),
      m.abort.signal,
    );
  }

  #migration(id: string, pid: number): SourceMigration {
    const { migrations, processes } = this.context;
    const existing = migrations.get(id);
    if (existing !== undefined) {
      if (!isSource(existing) || existing.pid !== pid) throw new MigrationStateError(`migration ${id} is not this one`);
      return existing;
    }
    if (!processes.exists(pid)) {
      throw unchanged(new InvalidInputError(`no process with PID ${pid} on ${this.context.node}`));
    }
    const dir = join(this.context.imagesRoot, id);
    mkdirSync(dir, { mode: 0o700 });
    const m: SourceMigration = {
      role: 'source',
      id,
      dir,
      pid,
      workload: this.context.workloads.findByPid(pid)?.name,
      abort: new AbortController(),
      work: new Set(),
      idleSince: performance.now(),
    };
    migrations.add(m);
    return m;
  }
}

/**
 * What CRIU does with the tree's sockets and locks (preflight checked each
 * can move): established TCP connections are dumped with their state
 * (tcp_established), or closed when the controller asked (tcp_close); unix
 * datagram peers outside the tree are reconnected by path (ext_unix_sk);
 * file locks of every kind are dumped and taken again (file_locks); an
 * inotify watch CRIU cannot name by handle is looked for by path in the
 * workload's carried files (irmap_scan_paths). The
 * network is locked only when there are connections to lock: with
 * nftables CRIU makes a table even for none, and the restore on another
 * host cannot remove it.
 */
export function heldState(
  context: AgentContext,
  m: SourceMigration,
  p: BodyOf<'finalDump'>,
): {
  tcpEstablished?: boolean;
  tcpClose?: boolean;
  extUnixSk?: boolean;
  fileLocks?: boolean;
  irmapScanPaths?: string[];
  networkLock?: 'iptables' | 'nftables';
} {
  const close = p.tcpClose === true;
  const connections = context.processes.establishedTcp(m.pid);
  const record = m.workload === undefined ? undefined : context.workloads.find(m.workload);
  return {
    ...(close ? { tcpClose: true } : { tcpEstablished: true }),
    extUnixSk: true,
    fileLocks: true,
    // An inotify watch on a file system whose handles CRIU cannot open (overlayfs) is found by path,
    // in the files the workload carries.
    ...(record === undefined ? {} : { irmapScanPaths: carriedRoots(context.dataDir, record) }),
    ...(connections > 0 && !close ? { networkLock: context.networkLock } : {}),
  };
}

export function statsMessage(s: DumpStats): DumpStatsMessage {
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
