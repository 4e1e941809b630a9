/**
 * What the benchmark measures: workloads (memory size, hot set, dirty rate)
 * and strategies, and the samples each run yields.
 */
import { Option, type Command } from 'commander';
import { formatBytes, parseBytes } from '../../src/units.js';

/** How a process gets from host a to host b. */
export type StrategyName = 'bare' | 'bare-tls' | 'stop-and-copy' | 'precopy';
export type DirtyRate = 'low' | 'high';
/** The machine's lab hosts, or the kernel lab's (a qemu guest under software emulation, with dirty-memory tracking). */
export type Where = 'lab' | 'kernel-lab';

export const STRATEGY_LABELS: Record<StrategyName, string> = {
  bare: 'bare CRIU script',
  'bare-tls': 'bare CRIU script, TLS',
  'stop-and-copy': 'Ferry stop-and-copy',
  precopy: 'Ferry pre-copy',
};

/** How often the hot set is rewritten: every 100 ms, or as fast as the workload can. */
export const TICK_MS: Record<DirtyRate, number> = { low: 100, high: 0 };

export interface Workload {
  memoryBytes: number;
  hotPercent: number;
  rate: DirtyRate;
}

export interface Sample extends Workload {
  strategy: StrategyName;
  where: Where;
  run: number;
  /** From the freeze on the source to the process running on the destination. */
  downtimeMs: number;
  /** From the first step (page server or preflight) to the process running on the destination. */
  totalMs: number;
  /** Memory pages plus the other images. */
  bytesSent: number;
  /** Copies of memory: pre-copy rounds plus the final dump. */
  rounds: number;
  /**
   * Where the downtime went, in ms. Bare: dump, copy, restore (and CRIU's start-up before the
   * freeze, outside the downtime). Ferry: dump, stream, restore, commit, resume (each timed by the
   * agent doing it) and protocol (the rest: messages and round trips between the steps).
   */
  parts: Record<string, number>;
}

export interface MatrixOptions {
  sizes: number[];
  hot: number[];
  rates: DirtyRate[];
  /** Sizes that run every hot set and dirty rate; the others run the reference workload only. */
  matrixSizes: number[];
  runs: number;
  strategies: StrategyName[];
}

/** The workload every size runs: hot 10 % at the low rate, or the lists' first values. */
export function reference(options: Pick<MatrixOptions, 'hot' | 'rates'>): { hotPercent: number; rate: DirtyRate } {
  return {
    hotPercent: options.hot.includes(10) ? 10 : (options.hot[0] ?? 10),
    rate: options.rates.includes('low') ? 'low' : (options.rates[0] ?? 'low'),
  };
}

export function workloads(options: Pick<MatrixOptions, 'sizes' | 'hot' | 'rates' | 'matrixSizes'>): Workload[] {
  const all: Workload[] = [];
  const ref = reference(options);
  for (const memoryBytes of options.sizes) {
    if (!options.matrixSizes.includes(memoryBytes)) {
      all.push({ memoryBytes, ...ref });
      continue;
    }
    for (const hotPercent of options.hot) for (const rate of options.rates) all.push({ memoryBytes, hotPercent, rate });
  }
  return all;
}

export function describeWorkload(w: Workload): string {
  return `${formatBytes(w.memoryBytes)}, hot ${w.hotPercent} %, ${w.rate} dirty rate`;
}

function list<T>(parse: (item: string) => T): (value: string) => T[] {
  return (value) =>
    value
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean)
      .map(parse);
}

function size(item: string): number {
  const bytes = parseBytes(item);
  if (bytes === undefined || bytes < 16 * 1024 * 1024) throw new Error(`not a memory size of 16M or more: ${item}`);
  return bytes;
}

function percent(item: string): number {
  const n = Number(item.replace(/%$/, ''));
  if (!(n > 0 && n <= 100)) throw new Error(`not a percentage (0 < n <= 100): ${item}`);
  return n;
}

function oneOf<T extends string>(values: readonly T[]): (item: string) => T {
  return (item) => {
    if (!(values as readonly string[]).includes(item)) throw new Error(`${item} is not one of ${values.join(', ')}`);
    return item as T;
  };
}

export const parseSizes = list(size);
export const parsePercents = list(percent);
export const parseRates = list(oneOf(['low', 'high'] as const));
export const parseStrategies = list(oneOf(['bare', 'bare-tls', 'stop-and-copy', 'precopy'] as const));

export function runCount(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 50) throw new Error(`runs: a whole number from 1 to 50, not ${value}`);
  return n;
}

/** The matrix's options, each also from a BENCH_* variable. */
export function addMatrixOptions(
  command: Command,
  defaults: { sizes: string; matrixSizes: string; hot: string; rates: string; runs: string; strategies: string },
): Command {
  return command
    .addOption(new Option('--sizes <LIST>', 'memory sizes of the workload').env('BENCH_SIZES').default(defaults.sizes))
    .addOption(
      new Option(
        '--matrix-sizes <LIST>',
        'sizes that run every hot set and dirty rate (the others: hot 10 %, low rate only); "all" for every size',
      )
        .env('BENCH_MATRIX_SIZES')
        .default(defaults.matrixSizes),
    )
    .addOption(
      new Option('--hot <LIST>', 'hot set: percent of the memory the workload keeps rewriting')
        .env('BENCH_HOT')
        .default(defaults.hot),
    )
    .addOption(
      new Option('--rates <LIST>', 'dirty rate: low (hot set rewritten every 100 ms) or high (continuously)')
        .env('BENCH_RATES')
        .default(defaults.rates),
    )
    .addOption(
      new Option('--runs <N>', 'runs of each strategy on each workload (the table shows medians)')
        .env('BENCH_RUNS')
        .default(defaults.runs),
    )
    .addOption(
      new Option('--strategies <LIST>', 'bare, bare-tls, stop-and-copy, precopy')
        .env('BENCH_STRATEGIES')
        .default(defaults.strategies),
    );
}

export function matrixFrom(opts: {
  sizes: string;
  matrixSizes: string;
  hot: string;
  rates: string;
  runs: string;
  strategies: string;
}): MatrixOptions {
  const sizes = parseSizes(opts.sizes);
  return {
    sizes,
    matrixSizes: opts.matrixSizes === 'all' ? sizes : parseSizes(opts.matrixSizes),
    hot: parsePercents(opts.hot),
    rates: parseRates(opts.rates),
    runs: runCount(opts.runs),
    strategies: parseStrategies(opts.strategies),
  };
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((x, y) => x - y);
  if (sorted.length === 0) return NaN;
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? NaN) : ((sorted[mid - 1] ?? NaN) + (sorted[mid] ?? NaN)) / 2;
}
