import { readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { log } from '../src/log.js';
import type { AgentContext } from './context.js';
import { giveUp, movingAddress, takeBack } from './address-move.js';
import { isFinal, type JournalEntry } from './journal.js';

const RECOVERY = ['recovery'] as const;
/** How often a migration that cannot be settled yet (its source unreachable) is tried again. */
const RETRY_MS = 2_000;

/**
 * Settles what the journal says is half-done and no migration here is
 * working on: after a crash (at start) and on `ferry recover`. The source
 * is the authority: a source's record and its process's existence say
 * how CRIU ended it; a destination asks its source.
 */
export class Recovery {
  #timer: NodeJS.Timeout | undefined;

  constructor(private readonly context: AgentContext) {}

  /** Settles every open record; those that cannot be settled yet are retried every few seconds. */
  async recover(): Promise<JournalEntry[]> {
    const { journal, migrations } = this.context;
    const settled: JournalEntry[] = [];
    let retry = false;
    for (const entry of journal.list()) {
      if (isFinal(entry) || migrations.has(entry.id)) continue;
      try {
        const after = entry.role === 'source' ? await this.source(entry) : await this.#destination(entry);
        if (!isFinal(after)) retry = true;
        settled.push(after);
      } catch (error) {
        log.error('recovery failed', { migration: entry.id, error: (error as Error).message });
        retry = true;
      }
    }
    this.#cleanOrphanImages();
    if (retry && this.#timer === undefined) {
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        void this.recover();
      }, RETRY_MS);
      this.#timer.unref();
    }
    return settled;
  }

  stop(): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** A source record left by a crash: the process's existence says how CRIU ended it. */
  async source(entry: JournalEntry): Promise<JournalEntry> {
    const { journal, processes, workloads } = this.context;
    // CRIU may still be finishing (thawing or killing) the tree it held.
    for (let i = 0; i < 300 && entry.pid !== undefined && processes.tracer(entry.pid) !== 0; i++) await sleep(50);
    const alive = processes.same(entry.pid, entry.pidStart);
    const committed = entry.state === 'committing' && !alive;
    // The process resumed here without the address it had let go: it gets it back.
    const moving = movingAddress(entry.workload?.name ? workloads.find(entry.workload.name) : undefined);
    if (alive && moving !== undefined && entry.addressDevice !== undefined) {
      moving.device = entry.addressDevice;
      await takeBack(this.context, entry.id, moving, entry.peerUrl);
    }
    if (committed && entry.workload?.name) workloads.forget(entry.workload.name);
    rmSync(entry.dir, { recursive: true, force: true });
    const after = journal.advance(
      entry.id,
      committed ? 'committed' : 'aborted',
      {
        action: committed
          ? 'recovered: the source copy had ended after the commit'
          : alive
            ? 'recovered: the process runs on the source'
            : 'recovered: the process was gone before any commit',
      },
      RECOVERY,
    )!;
    log.warn('recovered a source migration', { migration: entry.id, state: after.state, action: after.action });
    return after;
  }

  /** A destination record left by a crash: the source decides; the images are kept until then. */
  async #destination(entry: JournalEntry): Promise<JournalEntry> {
    const { criu, journal, peers, processes, workloads } = this.context;
    const outcome = await peers.outcome(entry.id, entry.peerUrl, 'source');
    if (outcome === 'pending' || outcome === 'unreachable') return entry;
    if (outcome === 'committed') {
      let pid = entry.pid;
      let action = 'recovered: the restored copy was already running';
      const running =
        processes.same(entry.pid, entry.pidStart) &&
        processes.tracer(entry.pid ?? 0) === 0 &&
        entry.state === 'resuming';
      if (!running) {
        // The held copy died with the old agent (CRIU kills it): restore it again from the kept images.
        pid = (await criu.restore({ imagesDir: join(entry.dir, 'final') })).pid;
        action = 'recovered: restored from the kept images after the commit';
      }
      if (entry.workload?.name) workloads.adopt(entry.workload, pid ?? 0);
      await this.context.addresses.release(entry.id);
      rmSync(entry.dir, { recursive: true, force: true });
      const after = journal.advance(
        entry.id,
        'resumed',
        { pid, pidStart: processes.startTime(pid ?? 0), action },
        RECOVERY,
      )!;
      log.warn('recovered a destination migration', { migration: entry.id, action });
      return after;
    }
    if (processes.same(entry.pid, entry.pidStart) && entry.state !== 'resuming') {
      processes.signal(entry.pid ?? 0, 'SIGKILL');
    }
    // The address this agent took for the copy goes back to the source.
    const moving = movingAddress(entry.workload);
    if (moving !== undefined && entry.addressDevice !== undefined) {
      moving.device = entry.addressDevice;
      await giveUp(this.context, entry.id, moving);
    }
    rmSync(entry.dir, { recursive: true, force: true });
    return journal.advance(entry.id, 'discarded', { action: `recovered: the source says ${outcome}` }, RECOVERY)!;
  }

  /** Image directories no journal entry accounts for (a crash before the first record). */
  #cleanOrphanImages(): void {
    const { imagesRoot, journal, migrations } = this.context;
    const known = new Set([
      ...journal
        .list()
        .filter((e) => !isFinal(e))
        .map((e) => e.id),
      ...migrations.ids(),
    ]);
    for (const name of readdirSync(imagesRoot)) {
      if (/^m-/.test(name) && !known.has(name)) rmSync(join(imagesRoot, name), { recursive: true, force: true });
    }
  }
}
