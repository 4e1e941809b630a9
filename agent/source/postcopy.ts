import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { lazyPortFromLog } from '../../src/criu/index.js';
import { deferred } from '../../src/deferred.js';
import { log } from '../../src/log.js';
import { DEFAULT_HOLD_MS, type BodyOf, type ReplyOf } from '../../src/wire/index.js';
import { pageTlsFor, type AgentContext } from '../context.js';
import { MigrationStateError, StepFailedError, unchanged } from '../errors.js';
import { dropCriuLock, letGo, takeBack } from '../address-move.js';
import { Hold, type Answer } from '../hold.js';
import type { SourceMigration, SourcePostcopy } from './migration.js';
import type { heldState, ControllerLink } from './source.js';
import { streamFinal, type Progress } from './stream.js';

/**
 * The source of a post-copy migration. The final dump freezes the process,
 * writes everything but its memory, then serves the memory on a port until
 * the destination's lazy-pages daemon has fetched it all. CRIU leaves the
 * process stopped when the transfer ends (leave_stopped), so the one Hold
 * here is over that stopped process: "yes" kills it, once the destination
 * confirms every page arrived; "no" continues it. Until the commit a lease
 * and the controller's connection can answer "no" (the source stops
 * serving and runs on); the commit pins the hold, and from then on only
 * the destination's word decides. A transfer that fails makes CRIU resume
 * the process at once.
 */
export class SourcePostcopyRole {
  constructor(private readonly context: AgentContext) {}

  async finalDump(
    m: SourceMigration,
    p: BodyOf<'finalDump'>,
    round: string,
    connection: ControllerLink,
    progress: Progress,
    socketOptions: ReturnType<typeof heldState>,
  ): Promise<ReplyOf<'finalDump'>> {
    const { criu, hooks, journal, metrics, migrations } = this.context;
    const dir = join(m.dir, round);
    let frozenAt = 0;
    let sent = { files: 0, bytes: 0 };
    let streamMs = 0;
    const serving = deferred<ReplyOf<'finalDump'>>();
    const postcopy: SourcePostcopy = { destinationUrl: p.destinationUrl ?? '' };
    m.postcopy = postcopy;
    const hold = this.#hold(m, postcopy);
    m.hold = hold;
    // Not given the migration's signal: after the commit this dump serves the only full copy of
    // the memory to a destination that already runs, so it ends by its transfer, never by a cancel.
    m.dump = migrations.track(
      m,
      criu
        .dump({
          pid: m.pid,
          imagesDir: dir,
          parentImg: p.parent ? `../${p.parent}` : undefined,
          trackMem: p.parent ? true : undefined,
          ...socketOptions,
          lazyPages: { port: 0, tls: pageTlsFor(this.context, p.plainPages) },
          leaveStopped: true,
          timeoutMs: 0,
          onNotify: async (event) => {
            if (event.script === 'pre-dump') {
              frozenAt = performance.now();
              progress('freezing and dumping all but the memory');
            }
            if (event.script === 'query-ext-files') {
              hooks.fault('source.frozen', { criuServicePid: criu.servicePid, imagesDir: dir });
            }
            if (event.script === 'post-dump') {
              if (m.address !== undefined) {
                await letGo(this.context, m.id, m.address);
                progress(`address ${m.address.address.cidr} withdrawn`);
              }
              const streamed = await streamFinal(this.context, m, round, p.destinationUrl ?? '', progress);
              metrics.phaseSeconds.observe({ phase: 'dump' }, (streamed.streamStarted - frozenAt) / 1000);
              sent = streamed.sent;
              streamMs = Math.round(performance.now() - streamed.streamStarted);
            }
            if (event.script === 'status-ready') {
              const port = lazyPortFromLog(join(dir, 'dump.log'));
              if (port === undefined) throw new Error('CRIU did not log its lazy page server’s port');
              postcopy.port = port;
              // Rolled back meanwhile: the release stops this server; the record says aborted already.
              if (hold.answer === undefined)
                journal.advance(m.id, 'held', { action: `serving memory on port ${port}` });
              progress(`serving memory to the destination on port ${port}`);
              serving.resolve({
                imageFiles: sent.files,
                imageBytes: sent.bytes,
                frozenMs: Math.round(performance.now() - frozenAt),
                streamMs,
                postcopyPort: port,
              });
            }
            return true;
          },
        })
        .catch((error: unknown) => {
          serving.reject(error);
          throw error;
        }),
    );
    m.dump.catch(() => undefined);
    // The transfer's end decides the source copy, whether or not a controller is still there.
    postcopy.settled = this.#settle(m, hold);
    try {
      const held = await serving.promise;
      hold.lease(p.holdMs || DEFAULT_HOLD_MS, () => {
        log.warn('no commit within the hold time: resuming the source', { migration: m.id });
        void hold.decide('no', 'no commit within the hold time');
      });
      hold.whileConnected(connection, () => {
        log.warn('the controller went away before the commit: resuming the source', { migration: m.id });
        void hold.decide('no', 'the controller went away before the commit');
      });
      return held;
    } catch (error) {
      await postcopy.settled;
      throw unchanged(new StepFailedError(error, { from: m.dir, to: join(this.context.dataDir, 'failed', m.id) }));
    }
  }

  /**
   * Yes: the destination has every page; the stopped source copy is killed.
   * No: the source copy continues (CRIU resumed it already when its
   * transfer failed). Either is journalled first.
   */
  #hold(m: SourceMigration, postcopy: SourcePostcopy): Hold {
    const { journal, migrations, processes, workloads } = this.context;
    return new Hold(
      { migrationId: m.id, role: 'source', signal: m.abort.signal },
      {
        record: (answer, why) => {
          if (answer === 'yes') journal.advance(m.id, 'committing');
          else journal.note(m.id, { action: `rolling back: ${why}` });
        },
        release: async (answer, why) => {
          if (answer === 'yes') {
            processes.signal(m.pid, 'SIGKILL');
            await dropCriuLock(this.context, m);
            journal.advance(m.id, 'committed');
            if (m.workload !== undefined) workloads.forget(m.workload);
            log.info('post-copy done: every page arrived; source process ended', { migration: m.id, pid: m.pid });
            await migrations.forget(m);
            return;
          }
          await this.#stopServing(m, postcopy);
          if (m.address !== undefined) await takeBack(this.context, m.id, m.address, postcopy.destinationUrl);
          processes.signal(m.pid, 'SIGCONT');
          await migrations.forget(m, true);
          journal.advance(m.id, 'aborted', { action: why });
          log.info('post-copy abandoned: source process continued', { migration: m.id, pid: m.pid });
        },
      },
    );
  }

  /**
   * The end of a post-copy source. A transfer that failed resumed the
   * process (CRIU does it); a transfer that ended left it stopped, and only
   * the destination's word ends it: "committed" once every page arrived
   * there, "aborted" once its copy is gone. Without an answer the process
   * stays stopped and the source keeps asking: ending it on a guess could
   * lose the process, continuing it could run it twice.
   */
  async #settle(m: SourceMigration, hold: Hold): Promise<Answer> {
    try {
      await m.dump;
    } catch (error) {
      const why = `the memory transfer failed (${(error as Error).message.slice(0, 200)}); CRIU resumed the process here`;
      log.warn('post-copy transfer failed: the source process resumed', { migration: m.id });
      return hold.decide('no', why);
    }
    const postcopy = m.postcopy;
    for (;;) {
      const taken = hold.decision;
      if (taken !== undefined) return taken;
      const outcome = await this.context.peers.outcome(m.id, postcopy?.destinationUrl ?? '', 'destination');
      if (outcome === 'committed') return hold.decide('yes', 'every page arrived on the destination');
      if (outcome === 'aborted' || outcome === 'unknown') {
        return hold.decide('no', 'the destination has no copy; the process resumed here');
      }
      await sleep(1_000);
    }
  }

  /**
   * The commit, in two steps: first (before the destination runs) the
   * source promises never to continue the process on its own say (the hold
   * is pinned); then, with settled, the answer waits until the destination
   * has every page and the source copy has ended.
   */
  async commit(m: SourceMigration, settled: boolean): Promise<ReplyOf<'commit'>> {
    const hold = m.hold;
    if (hold === undefined || hold.answer === 'no' || !hold.pin()) {
      throw new MigrationStateError(`migration ${m.id} was already rolled back here`);
    }
    if (!settled) {
      this.context.journal.advance(m.id, 'committing', { action: 'the destination runs; serving its memory' });
      return {};
    }
    const answer = await m.postcopy?.settled;
    if (answer !== 'yes') {
      throw new MigrationStateError(
        `migration ${m.id} did not complete: ${this.context.journal.read(m.id)?.action ?? 'aborted'}`,
      );
    }
    // No statistics: CRIU 4.1 resets them when its lazy page server starts (the destination counts the pages).
    return {};
  }

  /** Rolls back before the commit: the source stops serving and its process continues here. */
  async abort(m: SourceMigration, reason: string): Promise<void> {
    const hold = m.hold;
    if (hold?.pinned === true) throw new MigrationStateError(`migration ${m.id} is already committed here`);
    await hold?.decide('no', `aborted: ${reason}`);
  }

  outcome(m: SourceMigration): 'committed' | 'aborted' | 'pending' {
    if (m.hold?.answer === 'no') return 'aborted';
    return m.hold?.pinned === true ? 'committed' : 'pending';
  }

  /**
   * A lazy dump serves one connection and waits for it as long as it takes:
   * with no destination coming, a connection that ends at once ends the
   * wait (CRIU then resumes the process, or leaves it stopped for the
   * release to continue it). If it is still serving a destination that does
   * not let go, its CRIU worker is killed, which releases the process too.
   */
  async #stopServing(m: SourceMigration, postcopy: SourcePostcopy): Promise<void> {
    const port = postcopy.port;
    if (port !== undefined) {
      await new Promise<void>((done) => {
        const socket = createConnection({ host: this.context.advertise, port }, () => socket.end());
        socket.on('error', () => done());
        socket.on('close', () => done());
      });
    }
    const ended = m.dump?.then(
      () => true,
      () => true,
    );
    if ((await Promise.race([ended, sleep(10_000).then(() => false)])) === true) return;
    const worker = criuWorkerIn(this.context.criu.servicePid, join(m.dir, m.finalRound ?? 'final'));
    log.warn('the lazy page server did not stop: ending its CRIU worker', { migration: m.id, worker });
    if (worker !== undefined) this.context.processes.signal(worker, 'SIGKILL');
    await ended;
  }
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
