import { join } from 'node:path';
import { lazyPagesCopied, logReason } from '../../src/criu/index.js';
import { log } from '../../src/log.js';
import { formatBytes } from '../../src/units.js';
import type { BodyOf, ReplyOf } from '../../src/wire/index.js';
import { pageTlsFor, type AgentContext } from '../context.js';
import { residentBytes } from '../process.js';
import type { DestinationMigration } from './migration.js';
import { PAGE_FLOW_INTERVAL_MS } from './page-flow.js';

/** How long a finished post-copy destination stays to answer how it ended (the source and the controller ask). */
const KEPT_FOR_QUESTIONS_MS = 60_000;

/**
 * The destination of a post-copy migration: a `criu lazy-pages` daemon
 * fetches the memory from the source while the copy already runs. When it
 * has all of it the migration is done; when it ends without (the source or
 * the link lost), the copy here has holes in its memory and must not run
 * on: it is killed, and the source hears that it has no copy here.
 */
export class DestinationPostcopyRole {
  constructor(private readonly context: AgentContext) {}

  /** The daemon that will fetch the memory listens before the restore hands it the process. */
  async startFetching(m: DestinationMigration, dir: string, r: BodyOf<'restore'>): Promise<void> {
    const daemon = this.context.criu.startLazyPages({
      imagesDir: dir,
      address: r.postcopyAddress ?? '',
      port: r.postcopyPort ?? 0,
      tls: pageTlsFor(this.context, r.plainPages),
    });
    m.postcopy = { daemon };
    await daemon.ready;
  }

  /** The copy was discarded before it ran (or the daemon did not start): the daemon goes too. */
  discard(m: DestinationMigration): void {
    if (m.postcopy === undefined) return;
    m.postcopy.result ??= { ok: false, detail: 'the copy here was discarded before it ran', ms: 0, pages: 0 };
    m.postcopy.daemon.kill();
  }

  /** After the resume: the copy runs; the daemon's end says whether it has all its memory. */
  awaitFetch(m: DestinationMigration, pid: number): void {
    const { journal, metrics, migrations, processes, workloads } = this.context;
    const postcopy = m.postcopy!;
    postcopy.resumedAt = performance.now();
    journal.advance(m.id, 'resuming', { pid, pidStart: processes.startTime(pid), action: 'fetching memory' });
    const watching = this.#watchFetch(m, pid);
    void postcopy.daemon.exited.then(async ({ code, signal }) => {
      clearInterval(watching);
      const ms = Math.round(performance.now() - (postcopy.resumedAt ?? 0));
      const logPath = join(m.dir, 'final', 'lazy-pages.log');
      if (code === 0) {
        postcopy.result = { ok: true, detail: 'every page arrived', ms, pages: lazyPagesCopied(logPath) };
        metrics.pagesSent.inc(postcopy.result.pages);
        journal.advance(m.id, 'resumed', { pid, pidStart: processes.startTime(pid), action: '' });
        log.info('post-copy: every page arrived', { migration: m.id, pid, ms });
      } else {
        const why = `criu lazy-pages ended with ${signal ?? `exit code ${code}`}: ${(await logReason(logPath)) ?? 'no error logged'}`;
        postcopy.result = { ok: false, detail: why, ms, pages: lazyPagesCopied(logPath) };
        processes.signal(pid, 'SIGKILL');
        if (m.workload?.name) workloads.forget(m.workload.name, { files: false });
        journal.advance(m.id, 'discarded', { action: `post-copy failed, the copy here was killed: ${why}` });
        log.error('post-copy failed: the copy here was killed', { migration: m.id, pid, reason: why });
      }
      setTimeout(() => void migrations.forget(m, postcopy.result?.ok !== true), KEPT_FOR_QUESTIONS_MS).unref();
    });
  }

  /**
   * The fetch's progress, twice a second: the memory the copy has here (its
   * tree's resident size) beyond what it had when it resumed, which grows as
   * the daemon copies pages in (and as the copy faults them in itself).
   */
  #watchFetch(m: DestinationMigration, pid: number): NodeJS.Timeout {
    const base = residentBytes(pid);
    const started = performance.now();
    let told = 0;
    const timer = setInterval(() => {
      const bytes = Math.max(0, residentBytes(pid) - base);
      if (bytes === told) return;
      told = bytes;
      const seconds = (performance.now() - started) / 1000;
      const rate = seconds > 0 ? Math.round(bytes / seconds) : 0;
      m.progressTo?.progress({
        migrationId: m.id,
        phase: 'postcopy',
        round: 'final',
        message: `memory arriving: ${formatBytes(bytes)} at ${formatBytes(rate)}/s`,
        bytes,
        transfer: true,
        bytesPerSecond: rate,
        source: this.context.node,
      });
    }, PAGE_FLOW_INTERVAL_MS);
    timer.unref();
    return timer;
  }

  outcome(m: DestinationMigration): ReplyOf<'outcomeQuery'> {
    const result = m.postcopy?.result;
    if (result === undefined) return { state: 'pending' };
    return {
      state: result.ok ? 'committed' : 'aborted',
      detail: result.detail,
      postcopyMs: result.ms,
      postcopyPages: result.pages,
    };
  }
}
