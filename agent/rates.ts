import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export type RateName = 'restore' | 'pageWrite';

/**
 * A cost's observations as exponentially weighted sums (each new one counts
 * as much as all before it together): weight, sizes (GiB), costs (ms), and
 * the products a straight-line fit needs.
 */
interface CostFit {
  w: number;
  x: number;
  y: number;
  xx: number;
  xy: number;
}

type Stored = Partial<Record<RateName, number>> & {
  /** Costs of an earlier format: a moving average, whatever the size. */
  costs?: Record<string, number>;
  fits?: Record<string, CostFit>;
};

const GiB = 1024 ** 3;

/**
 * The cost a fit predicts for a size: a straight line through what was
 * seen (a fixed part, and a part that grows with the memory), the plain
 * average while all sizes seen were alike, never below 0.
 */
export function fitCost(fit: CostFit, bytes: number): number {
  if (!(fit.w > 0)) return 0;
  const mx = fit.x / fit.w;
  const my = fit.y / fit.w;
  const variance = fit.xx / fit.w - mx * mx;
  // Sizes within about 100 MiB of each other say nothing about a slope.
  if (!(variance > 0.01)) return Math.max(0, my);
  const slope = Math.max(0, (fit.xy / fit.w - mx * my) / variance);
  const intercept = my - slope * mx;
  return Math.max(0, intercept + slope * (bytes / GiB));
}

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
    this.#save(all);
  }

  /**
   * A cost in ms, keyed by what it is for (a switchover from one source), of
   * an operation on `bytes` of memory, weighted like the rates (half weight
   * to the latest): a switchover's fixed part grows with the memory too (the
   * freeze, the source's end of its copy), so one size's cost is no guide
   * to another's.
   */
  learnCost(key: string, ms: number, bytes = 0): void {
    if (!Number.isFinite(ms) || ms < 0 || !Number.isFinite(bytes) || bytes < 0) return;
    const all = this.#load();
    const fits = { ...all.fits };
    const x = bytes / GiB;
    const f = fits[key] ?? { w: 0, x: 0, y: 0, xx: 0, xy: 0 };
    fits[key] = { w: f.w / 2 + 1, x: f.x / 2 + x, y: f.y / 2 + ms, xx: f.xx / 2 + x * x, xy: f.xy / 2 + x * ms };
    all.fits = fits;
    this.#save(all);
  }

  /** The learned cost for `bytes` of memory, or 0 before the first. */
  cost(key: string, bytes = 0): number {
    const stored = this.#load();
    const fit = stored.fits?.[key];
    const value = fit !== undefined ? fitCost(fit, bytes) : (stored.costs?.[key] ?? 0);
    return Number.isFinite(value) && value > 0 ? value : 0;
  }

  /** 0 before the first operation worth counting. */
  get(name: RateName): number {
    const rate = this.#load()[name] ?? 0;
    return Number.isFinite(rate) && rate > 0 ? rate : 0;
  }

  /** Whole or not at all: a crash mid-write leaves the previous file. */
  #save(all: Stored): void {
    const temporary = `${this.#file}.tmp`;
    writeFileSync(temporary, JSON.stringify(all) + '\n');
    renameSync(temporary, this.#file);
  }

  #load(): Stored {
    try {
      return JSON.parse(readFileSync(this.#file, 'utf8')) as Stored;
    } catch {
      return {};
    }
  }
}
