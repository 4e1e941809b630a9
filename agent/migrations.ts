import { copyFileSync, existsSync, mkdirSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { log } from '../src/log.js';
import type { Hold } from './hold.js';
import { MigrationStateError } from './errors.js';

/** What every migration in progress on this agent has, whatever its role. */
export interface LocalMigration {
  readonly role: 'source' | 'destination';
  readonly id: string;
  /** Its images here, one directory per round. */
  readonly dir: string;
  /** One signal per migration: every CRIU call of it takes it; abort and the agent's stop fire it. */
  readonly abort: AbortController;
  /** CRIU calls of it in flight: its images are removed only once they have ended. */
  readonly work: Set<Promise<unknown>>;
  /** The decision owed while its process is held (created by the role when it holds one). */
  hold?: Hold | undefined;
  /** Run when the migration is forgotten (a destination ends page servers no dump came to). */
  onForget?: (() => void) | undefined;
}

/** The migrations this agent is working on, by id; where they end up once done. */
export class Migrations<M extends LocalMigration> {
  readonly #byId = new Map<string, M>();

  constructor(private readonly dataDir: string) {}

  get(id: string): M | undefined {
    return this.#byId.get(id);
  }

  has(id: string): boolean {
    return this.#byId.has(id);
  }

  add(m: M): M {
    if (this.#byId.has(m.id)) throw new MigrationStateError(`migration ${m.id} is already known here`);
    this.#byId.set(m.id, m);
    return m;
  }

  ids(): string[] {
    return [...this.#byId.keys()];
  }

  all(): M[] {
    return [...this.#byId.values()];
  }

  /** Runs a CRIU call of the migration, so that cancel() can wait for it. */
  track<T>(m: LocalMigration, call: Promise<T>): Promise<T> {
    m.work.add(call);
    const done = (): void => void m.work.delete(call);
    call.then(done, done);
    return call;
  }

  /** Fires the migration's signal and waits until its CRIU calls have ended. */
  async cancel(m: LocalMigration, reason: Error): Promise<void> {
    if (!m.abort.signal.aborted) m.abort.abort(reason);
    await Promise.allSettled([...m.work]);
  }

  /**
   * Drops the migration and its images, and resolves once they are gone.
   * After a failure (keepLogs), CRIU's logs are first kept in DATA/failed/ID,
   * whose path is returned. Safe to call twice.
   */
  async forget(m: LocalMigration, keepLogs = false): Promise<string | undefined> {
    if (this.#byId.get(m.id) === m) this.#byId.delete(m.id);
    m.onForget?.();
    m.onForget = undefined;
    let kept: string | undefined;
    if (keepLogs && existsSync(m.dir)) {
      kept = join(this.dataDir, 'failed', m.id);
      for (const round of readdirSync(m.dir)) {
        const roundDir = join(m.dir, round);
        if (!statSync(roundDir).isDirectory()) continue;
        for (const name of readdirSync(roundDir).filter((n) => n.endsWith('.log'))) {
          mkdirSync(join(kept, round), { recursive: true });
          copyFileSync(join(roundDir, name), join(kept, round, name));
        }
      }
    }
    await remove(m.dir);
    return kept;
  }
}

/**
 * Removes a migration's directory. A CRIU worker that was just cut off (a
 * cancelled restore) can still be writing its log there for a moment, so a
 * removal that meets new files is tried again, for up to five seconds.
 */
async function remove(dir: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      rmSync(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 20 });
      return;
    } catch (error) {
      if (attempt >= 20) {
        log.warn('could not remove a migration’s images', { dir, error: (error as Error).message });
        return;
      }
      await sleep(250);
    }
  }
}
