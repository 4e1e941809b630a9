/**
 * The benchmark's matrix, samples, summary and outputs (table, CSV, SVG),
 * shared by the host part (scripts/bench.ts) and the kernel-lab part
 * (scripts/bench-precopy.ts).
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { hostEndpoint, type LabHost } from '../controller/lab/index.js';
import type { MigrationReport } from '../controller/migration/index.js';
import { runWorkload } from '../controller/agents/index.js';
import { projectRoot } from '../src/paths.js';

export type Rate = 'low' | 'high';

export interface Cell {
  memoryMb: number;
  hotPercent: number;
  hotMb: number;
  rate: Rate;
  /** The counter's tick: low rewrites the hot set 5 times a second, high as fast as it can. */
  tickMs: number;
}

export interface Sample {
  method: string;
  memoryMb: number;
  hotPercent: number;
  rate: Rate;
  run: number;
  downtimeMs: number;
  totalMs: number;
  bytes: number;
  rounds: number;
  /** Where the downtime went (Ferry: dump, stream, restore, commit; bare: dump, copy, restore). */
  parts: Record<string, number>;
  predictedMs?: number | undefined;
}

export function cells(sizes: readonly number[]): Cell[] {
  const hot = (process.env.BENCH_HOT ?? '1,10,50').split(',').map(Number);
  const rates = (process.env.BENCH_RATES ?? 'low,high').split(',') as Rate[];
  const out: Cell[] = [];
  for (const memoryMb of sizes) {
    for (const hotPercent of hot) {
      for (const rate of rates) {
        out.push({
          memoryMb,
          hotPercent,
          hotMb: Math.max(1, Math.round((memoryMb * hotPercent) / 100)),
          rate,
          tickMs: rate === 'low' ? 200 : 0,
        });
      }
    }
  }
  return out;
}

/**
 * Ferry's downtime in parts: frozen until the source held the dump (dump and
 * image streaming), the destination's restore, commit and resume; the rest
 * is the protocol's round trips between those steps.
 */
/**
 * Starts a cell's counter on lab host a and waits while it faults its memory
 * in (msPerMib of it: emulation is slower), so the migration measures a
 * process with its memory resident.
 */
export async function startWorkload(
  a: LabHost,
  name: string,
  cell: Cell,
  fault: { minMs: number; msPerMib: number },
): Promise<{ pid: number; dir: string }> {
  const counter = join(projectRoot(), 'dist', 'examples', 'counter');
  // Its state file in its own directory (on a, inside the host), which moves with it.
  const w = await runWorkload(
    hostEndpoint(a),
    name,
    [counter, 'state', String(cell.tickMs), String(cell.memoryMb), String(cell.hotMb)],
    'bench',
  );
  await sleep(Math.max(fault.minMs, cell.memoryMb * fault.msPerMib));
  return { pid: w.pid ?? 0, dir: join(a.dataDir, 'workloads', name) };
}

export function sampleOf(cell: Cell, method: string, run: number, report: MigrationReport): Sample {
  const measured = report.final.heldMs + report.final.restoreMs + report.phasesMs.commit;
  // Post-copy's commit phase goes on while the memory is fetched, after the downtime ended: its
  // commit and resume are what the downtime leaves after the dump and the restore.
  const parts: Record<string, number> =
    report.postcopy === undefined
      ? {
          'dump+stream': Math.round(report.final.heldMs),
          stream: report.final.streamMs,
          restore: report.final.restoreMs,
          'commit+resume': Math.round(report.phasesMs.commit),
          'round trips': Math.round(report.downtimeMs - measured),
        }
      : {
          'dump+stream': Math.round(report.final.heldMs),
          stream: report.final.streamMs,
          restore: report.final.restoreMs,
          'commit+resume': Math.round(report.downtimeMs - report.final.heldMs - report.final.restoreMs),
          'post-copy fetch': report.postcopy.fetchMs,
        };
  return {
    method,
    memoryMb: cell.memoryMb,
    hotPercent: cell.hotPercent,
    rate: cell.rate,
    run,
    downtimeMs: report.downtimeMs,
    totalMs: report.totalMs,
    bytes: report.bytesSent,
    rounds: report.rounds.length,
    parts,
    predictedMs: report.policy.predictedDowntimeMs,
  };
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((x, y) => x - y);
  if (sorted.length === 0) return NaN;
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? NaN) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

export interface Row {
  method: string;
  memoryMb: number;
  hotPercent: number;
  rate: Rate;
  runs: number;
  downtimeMs: number;
  totalMs: number;
  bytes: number;
  rounds: number;
  parts: Record<string, number>;
  predictedMs: number | undefined;
  /** The median of each run's (predicted - measured) / measured downtime. */
  predictionError: number | undefined;
}

const key = (s: { method: string; memoryMb: number; hotPercent: number; rate: Rate }): string =>
  `${s.method}|${s.memoryMb}|${s.hotPercent}|${s.rate}`;

/** Medians per method and cell. */
export function summarize(samples: readonly Sample[]): Row[] {
  const groups = new Map<string, Sample[]>();
  for (const s of samples) groups.set(key(s), [...(groups.get(key(s)) ?? []), s]);
  return [...groups.values()].map((g) => {
    const first = g[0] as Sample;
    const parts: Record<string, number> = {};
    for (const name of Object.keys(first.parts)) parts[name] = median(g.map((s) => s.parts[name] ?? 0));
    const predicted = g.map((s) => s.predictedMs).filter((p): p is number => p !== undefined);
    const errors = g
      .filter((s) => s.predictedMs !== undefined && s.downtimeMs > 0)
      .map((s) => ((s.predictedMs ?? 0) - s.downtimeMs) / s.downtimeMs);
    return {
      method: first.method,
      memoryMb: first.memoryMb,
      hotPercent: first.hotPercent,
      rate: first.rate,
      runs: g.length,
      downtimeMs: median(g.map((s) => s.downtimeMs)),
      totalMs: median(g.map((s) => s.totalMs)),
      bytes: median(g.map((s) => s.bytes)),
      rounds: median(g.map((s) => s.rounds)),
      parts,
      predictedMs: predicted.length === 0 ? undefined : median(predicted),
      predictionError: errors.length === 0 ? undefined : median(errors),
    };
  });
}

function ms(n: number): string {
  return n >= 10_000 ? `${(n / 1000).toFixed(1)} s` : `${Math.round(n)} ms`;
}

function percent(fraction: number): string {
  const p = Math.round(fraction * 100);
  return `${p > 0 ? '+' : ''}${p} %`;
}

/** The cell whose prediction missed most (median error per cell), for the line under the table. */
export function worstPrediction(rows: readonly Row[]): string | undefined {
  const predicted = rows.filter((r) => r.predictionError !== undefined);
  if (predicted.length === 0) return undefined;
  const worst = predicted.reduce((a, b) =>
    Math.abs(b.predictionError ?? 0) > Math.abs(a.predictionError ?? 0) ? b : a,
  );
  return (
    `prediction error (predicted against measured downtime, median per cell): worst ${percent(worst.predictionError ?? 0)} ` +
    `(${worst.method}, ${worst.memoryMb} MiB hot ${worst.hotPercent} % ${worst.rate}); target within ±25 %`
  );
}

function mib(bytes: number): string {
  return bytes >= 1024 ** 3 ? `${(bytes / 1024 ** 3).toFixed(2)} GiB` : `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}

/** The table: one line per cell and method; Ferry's stop-and-copy against the bare script of the same cell. */
export function table(rows: readonly Row[], baseline: string, compared: string): string {
  const header = [
    'memory',
    'hot',
    'rate',
    'method',
    'downtime',
    'predicted',
    'error',
    'total',
    'sent',
    'rounds',
    'runs',
    'vs bare',
  ];
  const lines = [header];
  const sorted = [...rows].sort(
    (a, b) =>
      a.memoryMb - b.memoryMb ||
      a.hotPercent - b.hotPercent ||
      a.rate.localeCompare(b.rate) ||
      a.method.localeCompare(b.method),
  );
  for (const r of sorted) {
    const base = rows.find(
      (x) => x.method === baseline && x.memoryMb === r.memoryMb && x.hotPercent === r.hotPercent && x.rate === r.rate,
    );
    const vs =
      r.method === compared && base !== undefined ? `${((r.downtimeMs / base.downtimeMs - 1) * 100).toFixed(0)} %` : '';
    lines.push([
      `${r.memoryMb} MiB`,
      `${r.hotPercent} %`,
      r.rate,
      r.method,
      ms(r.downtimeMs),
      r.predictedMs === undefined ? '' : ms(r.predictedMs),
      r.predictionError === undefined ? '' : percent(r.predictionError),
      ms(r.totalMs),
      mib(r.bytes),
      String(r.rounds),
      String(r.runs),
      vs,
    ]);
  }
  const widths = header.map((_, i) => Math.max(...lines.map((l) => (l[i] ?? '').length)));
  return lines
    .map((l) =>
      l
        .map((c, i) => c.padEnd(widths[i] ?? 0))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

export function csv(samples: readonly Sample[]): string {
  const partNames = [...new Set(samples.flatMap((s) => Object.keys(s.parts)))];
  const header = [
    'method',
    'memory_mib',
    'hot_percent',
    'rate',
    'run',
    'downtime_ms',
    'predicted_ms',
    'total_ms',
    'bytes_sent',
    'rounds',
    ...partNames.map((p) => `${p.replace(/\W+/g, '_')}_ms`),
  ];
  const lines = [header.join(',')];
  for (const s of samples) {
    lines.push(
      [
        JSON.stringify(s.method),
        s.memoryMb,
        s.hotPercent,
        s.rate,
        s.run,
        Math.round(s.downtimeMs),
        s.predictedMs ?? '',
        Math.round(s.totalMs),
        s.bytes,
        s.rounds,
        ...partNames.map((p) => s.parts[p] ?? ''),
      ].join(','),
    );
  }
  return lines.join('\n') + '\n';
}

/**
 * Downtime against memory size, one line per method (the median over the
 * hot-set and rate cells of each size), log-log: what the plot is for is
 * how each method's downtime grows with memory.
 */
export function svg(rows: readonly Row[]): string {
  const W = 760;
  const H = 460;
  const m = { left: 70, right: 230, top: 30, bottom: 50 };
  const methods = [...new Set(rows.map((r) => r.method))];
  const sizes = [...new Set(rows.map((r) => r.memoryMb))].sort((a, b) => a - b);
  const points = methods.map((method) =>
    sizes
      .map((size) => {
        const at = rows.filter((r) => r.method === method && r.memoryMb === size).map((r) => r.downtimeMs);
        return at.length === 0 ? undefined : { size, downtime: median(at) };
      })
      .filter((p): p is { size: number; downtime: number } => p !== undefined),
  );
  const all = points.flat().map((p) => p.downtime);
  const yMin = Math.max(10, Math.min(...all) / 1.5);
  const yMax = Math.max(...all) * 1.5;
  const xMin = Math.min(...sizes) / 1.3;
  const xMax = Math.max(...sizes) * 1.3;
  const x = (v: number): number =>
    m.left + ((Math.log(v) - Math.log(xMin)) / (Math.log(xMax) - Math.log(xMin))) * (W - m.left - m.right);
  const y = (v: number): number =>
    H - m.bottom - ((Math.log(v) - Math.log(yMin)) / (Math.log(yMax) - Math.log(yMin))) * (H - m.top - m.bottom);
  const colors = ['#1b6ac9', '#d1495b', '#2e933c', '#edae49', '#6b3fa0', '#00798c'];
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${m.left}" y="18" font-size="14">Downtime against memory size (median over hot sets and dirty rates)</text>`,
    `<line x1="${m.left}" y1="${H - m.bottom}" x2="${W - m.right}" y2="${H - m.bottom}" stroke="black"/>`,
    `<line x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${H - m.bottom}" stroke="black"/>`,
    `<text x="${(m.left + W - m.right) / 2}" y="${H - 12}" text-anchor="middle">memory (MiB, log scale)</text>`,
    `<text transform="translate(16 ${(m.top + H - m.bottom) / 2}) rotate(-90)" text-anchor="middle">downtime (ms, log scale)</text>`,
  ];
  for (const size of sizes) {
    parts.push(`<line x1="${x(size)}" y1="${H - m.bottom}" x2="${x(size)}" y2="${H - m.bottom + 5}" stroke="black"/>`);
    parts.push(`<text x="${x(size)}" y="${H - m.bottom + 18}" text-anchor="middle">${size}</text>`);
  }
  for (let v = 10 ** Math.floor(Math.log10(yMin)); v <= yMax; v *= 10) {
    for (const f of [1, 2, 5]) {
      const t = v * f;
      if (t < yMin || t > yMax) continue;
      parts.push(`<line x1="${m.left}" y1="${y(t)}" x2="${W - m.right}" y2="${y(t)}" stroke="#ddd"/>`);
      parts.push(`<text x="${m.left - 6}" y="${y(t) + 4}" text-anchor="end">${t}</text>`);
    }
  }
  methods.forEach((method, i) => {
    const color = colors[i % colors.length] ?? 'black';
    const line = points[i] ?? [];
    parts.push(
      `<polyline fill="none" stroke="${color}" stroke-width="2" points="${line.map((p) => `${x(p.size).toFixed(1)},${y(p.downtime).toFixed(1)}`).join(' ')}"/>`,
    );
    for (const p of line)
      parts.push(`<circle cx="${x(p.size).toFixed(1)}" cy="${y(p.downtime).toFixed(1)}" r="3.5" fill="${color}"/>`);
    parts.push(`<rect x="${W - m.right + 15}" y="${m.top + i * 20}" width="12" height="12" fill="${color}"/>`);
    parts.push(
      `<text x="${W - m.right + 32}" y="${m.top + i * 20 + 11}">${method.replace(/&/g, '&amp;').replace(/</g, '&lt;')}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}
