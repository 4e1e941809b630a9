import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export type RateName = 'restore' | 'pageWrite';

type Stored = Partial<Record<RateName, number>> & { costs?: Record<string, number> };

/**
 * Rates this node has shown, in bytes per ms, each a moving average of its
 * operations (half weight to the latest), kept in DATA/rates.json. The
 * controller's downtime prediction uses them in place of constants, so a
 * slow node (an emulated one reads memory ten times slower) is predicted as
 * slow. Operations under 16 MiB say more about fixed costs than rates and
 * are not counted.
 */
export class LearnedRates {
  readonly #file: string;

  constructor(dataDir: string) {
    this.#file = join(dataDir, 'rates.json');
  }

  learn(name: RateName, bytes: number, ms: number): void {
    if (bytes < 16 * 1024 * 1024 || ms <= 0) return;
    const observed = bytes / ms;
    const all = this.#load();
    const previous = all[name] ?? 0;
    all[name] = previous > 0 ? (previous + observed) / 2 : observed;
    const temporary = `${this.#file}.tmp`;
    writeFileSync(temporary, JSON.stringify(all) + '\n');
    renameSync(temporary, this.#file);
  }

  /**
   * A cost in ms, keyed by what it is for (a switchover from one source), as
   * a moving average like the rates (half weight to the latest).
   */
  learnCost(key: string, ms: number): void {
    if (!Number.isFinite(ms) || ms < 0) return;
    const all = this.#load();
    const costs = { ...all.costs };
    const previous = costs[key];
    costs[key] = previous !== undefined && previous >= 0 ? (previous + ms) / 2 : ms;
    all.costs = costs;
    const temporary = `${this.#file}.tmp`;
    writeFileSync(temporary, JSON.stringify(all) + '\n');
    renameSync(temporary, this.#file);
  }

  /** The learned cost, or 0 before the first. */
  cost(key: string): number {
    const value = this.#load().costs?.[key] ?? 0;
    return Number.isFinite(value) && value > 0 ? value : 0;
  }

  /** 0 before the first operation worth counting. */
  get(name: RateName): number {
    const rate = this.#load()[name] ?? 0;
    return Number.isFinite(rate) && rate > 0 ? rate : 0;
  }

  #load(): Stored {
    try {
      return JSON.parse(readFileSync(this.#file, 'utf8')) as Stored;
    } catch {
      return {};
    }
  }
}
