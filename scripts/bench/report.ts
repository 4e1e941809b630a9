/** The benchmark's outputs: the table, the overhead breakdown, CSV files and an SVG plot. */
import { formatBytes } from '../../src/units.js';
import { median, STRATEGY_LABELS, type Sample, type StrategyName, type Where, type Workload } from './matrix.js';

export interface Row extends Workload {
  strategy: StrategyName;
  where: Where;
  runs: number;
  downtimeMs: number;
  totalMs: number;
  bytesSent: number;
  rounds: number;
  parts: Record<string, number>;
}

const STRATEGY_ORDER: StrategyName[] = ['bare', 'bare-tls', 'stop-and-copy', 'precopy'];
const RATE_ORDER = ['low', 'high'];

export function label(strategy: StrategyName, where: Where): string {
  return where === 'lab' ? STRATEGY_LABELS[strategy] : `${STRATEGY_LABELS[strategy]} (kernel lab)`;
}

function key(s: Workload & { strategy: StrategyName; where: Where }): string {
  return [s.where, s.memoryBytes, s.hotPercent, s.rate, s.strategy].join('|');
}

/** Medians of every measure over the runs of each strategy on each workload. */
export function summarize(samples: readonly Sample[]): Row[] {
  const groups = new Map<string, Sample[]>();
  for (const s of samples) groups.set(key(s), [...(groups.get(key(s)) ?? []), s]);
  const rows: Row[] = [];
  for (const group of groups.values()) {
    const first = group[0];
    if (first === undefined) continue;
    const partNames = [...new Set(group.flatMap((s) => Object.keys(s.parts)))];
    rows.push({
      memoryBytes: first.memoryBytes,
      hotPercent: first.hotPercent,
      rate: first.rate,
      strategy: first.strategy,
      where: first.where,
      runs: group.length,
      downtimeMs: median(group.map((s) => s.downtimeMs)),
      totalMs: median(group.map((s) => s.totalMs)),
      bytesSent: median(group.map((s) => s.bytesSent)),
      rounds: median(group.map((s) => s.rounds)),
      parts: Object.fromEntries(partNames.map((p) => [p, median(group.map((s) => s.parts[p] ?? 0))])),
    });
  }
  return rows.sort(
    (x, y) =>
      (x.where === y.where ? 0 : x.where === 'lab' ? -1 : 1) ||
      x.memoryBytes - y.memoryBytes ||
      x.hotPercent - y.hotPercent ||
      RATE_ORDER.indexOf(x.rate) - RATE_ORDER.indexOf(y.rate) ||
      STRATEGY_ORDER.indexOf(x.strategy) - STRATEGY_ORDER.indexOf(y.strategy),
  );
}

function ms(n: number): string {
  if (!Number.isFinite(n)) return '-';
  return n >= 10_000 ? `${(n / 1000).toFixed(1)} s` : `${Math.round(n)} ms`;
}

function pct(ratio: number): string {
  if (!Number.isFinite(ratio)) return '';
  const p = Math.round((ratio - 1) * 100);
  return `${p >= 0 ? '+' : ''}${p} %`;
}

function table(header: string[], rows: string[][], rightFrom: number): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => (i >= rightFrom ? c.padStart(widths[i] ?? 0) : c.padEnd(widths[i] ?? 0)))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

/** The main table: one line per strategy and workload, medians over the runs. */
export function resultsTable(rows: readonly Row[]): string {
  const out: string[][] = [];
  let previous = '';
  for (const r of rows) {
    const workload = `${r.where}|${r.memoryBytes}|${r.hotPercent}|${r.rate}`;
    const first = workload !== previous;
    previous = workload;
    const bareTls = rows.find(
      (x) =>
        x.strategy === 'bare-tls' &&
        x.where === r.where &&
        x.memoryBytes === r.memoryBytes &&
        x.hotPercent === r.hotPercent &&
        x.rate === r.rate,
    );
    out.push([
      first ? formatBytes(r.memoryBytes) : '',
      first ? `${r.hotPercent} %` : '',
      first ? r.rate : '',
      label(r.strategy, r.where),
      ms(r.downtimeMs),
      ms(r.totalMs),
      formatBytes(r.bytesSent),
      String(r.rounds),
      String(r.runs),
      bareTls === undefined || r.strategy === 'bare-tls' ? '' : pct(r.downtimeMs / bareTls.downtimeMs),
    ]);
  }
  return table(
    ['memory', 'hot', 'dirty', 'strategy', 'downtime', 'total', 'sent', 'rounds', 'runs', 'vs bare TLS'],
    out,
    4,
  );
}

/**
 * Ferry's stop-and-copy against the bare script, per memory size, with the
 * downtime split into its steps: medians over every run of that size (the
 * hot set and dirty rate do not change what stop-and-copy does while frozen).
 */
export function overhead(samples: readonly Sample[], where: Where): { text: string; ratios: Map<number, number> } {
  const sizes = [...new Set(samples.filter((s) => s.where === where).map((s) => s.memoryBytes))].sort((x, y) => x - y);
  const rows: string[][] = [];
  const ratios = new Map<number, number>();
  for (const size of sizes) {
    const of = (strategy: StrategyName): Sample[] =>
      samples.filter((s) => s.where === where && s.memoryBytes === size && s.strategy === strategy);
    const baseline = median(of('bare-tls').map((s) => s.downtimeMs));
    let first = true;
    for (const strategy of ['bare', 'bare-tls', 'stop-and-copy'] as const) {
      const runs = of(strategy);
      if (runs.length === 0) continue;
      const part = (p: string): string => ms(median(runs.map((s) => s.parts[p] ?? NaN)));
      const downtime = median(runs.map((s) => s.downtimeMs));
      if (strategy === 'stop-and-copy') ratios.set(size, downtime / baseline);
      const bare = strategy !== 'stop-and-copy';
      rows.push([
        first ? formatBytes(size) : '',
        label(strategy, where),
        String(runs.length),
        ms(downtime),
        part('dump'),
        bare ? part('copy') : part('stream'),
        part('restore'),
        bare ? '' : part('commit'),
        bare ? '' : part('resume'),
        bare ? '' : part('protocol'),
        bare ? part('startup') : part('preflight'),
        strategy === 'bare-tls' ? '' : pct(downtime / baseline),
      ]);
      first = false;
    }
  }
  const text = table(
    [
      'memory',
      'method',
      'runs',
      'downtime',
      'dump',
      'copy|stream',
      'restore',
      'commit',
      'resume',
      'protocol',
      'startup|preflight',
      'vs bare TLS',
    ],
    rows,
    2,
  );
  return { text, ratios };
}

function csvCell(value: string | number): string {
  const text = typeof value === 'number' ? (Number.isInteger(value) ? String(value) : value.toFixed(1)) : value;
  return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

const PART_COLUMNS = [
  'dump',
  'copy',
  'stream',
  'restore',
  'commit',
  'resume',
  'protocol',
  'startup',
  'preflight',
  'precopy',
];

/** Every run, one line each. */
export function runsCsv(samples: readonly Sample[]): string {
  const header = [
    'where',
    'strategy',
    'memory_bytes',
    'hot_percent',
    'dirty_rate',
    'run',
    'downtime_ms',
    'total_ms',
    'bytes_sent',
    'rounds',
    ...PART_COLUMNS.map((p) => `${p}_ms`),
  ];
  const lines = samples.map((s) =>
    [
      s.where,
      s.strategy,
      s.memoryBytes,
      s.hotPercent,
      s.rate,
      s.run,
      s.downtimeMs,
      s.totalMs,
      s.bytesSent,
      s.rounds,
      ...PART_COLUMNS.map((p) => s.parts[p] ?? ''),
    ]
      .map(csvCell)
      .join(','),
  );
  return [header.join(','), ...lines].join('\n') + '\n';
}

/** The table's medians. */
export function summaryCsv(rows: readonly Row[]): string {
  const header = [
    'where',
    'strategy',
    'memory_bytes',
    'hot_percent',
    'dirty_rate',
    'runs',
    'downtime_ms',
    'total_ms',
    'bytes_sent',
    'rounds',
    ...PART_COLUMNS.map((p) => `${p}_ms`),
  ];
  const lines = rows.map((r) =>
    [
      r.where,
      r.strategy,
      r.memoryBytes,
      r.hotPercent,
      r.rate,
      r.runs,
      r.downtimeMs,
      r.totalMs,
      r.bytesSent,
      r.rounds,
      ...PART_COLUMNS.map((p) => r.parts[p] ?? ''),
    ]
      .map(csvCell)
      .join(','),
  );
  return [header.join(','), ...lines].join('\n') + '\n';
}

const COLORS: Record<StrategyName, string> = {
  bare: '#7f7f7f',
  'bare-tls': '#1f77b4',
  'stop-and-copy': '#d62728',
  precopy: '#2ca02c',
};

function escapeXml(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** 1-2-5 steps covering [low, high]. */
function ticks(low: number, high: number): number[] {
  const out: number[] = [];
  for (let decade = 10 ** Math.floor(Math.log10(low)); decade <= high * 10; decade *= 10) {
    for (const m of [1, 2, 5]) {
      const t = decade * m;
      if (t >= low / 1.0001 && t <= high * 1.0001) out.push(t);
    }
  }
  return out;
}

/**
 * Downtime against memory size, log-log: one line per strategy through the
 * reference workload (every size runs it), with each other workload as a
 * dot. Kernel-lab lines are dashed: emulated, so slower, and only comparable
 * with each other.
 */
export function downtimePlot(rows: readonly Row[], ref: { hotPercent: number; rate: string }): string {
  const width = 760;
  const height = 480;
  const m = { left: 70, right: 250, top: 40, bottom: 50 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const sizes = rows.map((r) => r.memoryBytes);
  const downtimes = rows.map((r) => r.downtimeMs).filter((d) => d > 0);
  if (sizes.length === 0 || downtimes.length === 0) return '<svg xmlns="http://www.w3.org/2000/svg"/>\n';
  const xMin = Math.min(...sizes) / 1.3;
  const xMax = Math.max(...sizes) * 1.3;
  const yTicks = ticks(Math.min(...downtimes) / 1.5, Math.max(...downtimes) * 1.5);
  const yMin = Math.min(Math.min(...downtimes) / 1.5, ...yTicks);
  const yMax = Math.max(Math.max(...downtimes) * 1.5, ...yTicks);
  const x = (v: number): number => m.left + (Math.log(v / xMin) / Math.log(xMax / xMin)) * plotW;
  const y = (v: number): number => m.top + plotH - (Math.log(v / yMin) / Math.log(yMax / yMin)) * plotH;
  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${m.left}" y="22" font-size="15">Downtime against memory size: lines hot ${ref.hotPercent} %, ${ref.rate} dirty rate; dots other workloads (medians)</text>`,
    `<rect x="${m.left}" y="${m.top}" width="${plotW}" height="${plotH}" fill="none" stroke="#333"/>`,
  );
  for (const t of yTicks) {
    parts.push(
      `<line x1="${m.left}" x2="${m.left + plotW}" y1="${y(t).toFixed(1)}" y2="${y(t).toFixed(1)}" stroke="#ddd"/>`,
      `<text x="${m.left - 6}" y="${(y(t) + 4).toFixed(1)}" text-anchor="end">${escapeXml(ms(t))}</text>`,
    );
  }
  for (const s of [...new Set(sizes)].sort((p, q) => p - q)) {
    parts.push(
      `<line x1="${x(s).toFixed(1)}" x2="${x(s).toFixed(1)}" y1="${m.top}" y2="${m.top + plotH}" stroke="#eee"/>`,
      `<text x="${x(s).toFixed(1)}" y="${m.top + plotH + 18}" text-anchor="middle">${escapeXml(formatBytes(s))}</text>`,
    );
  }
  parts.push(
    `<text x="${m.left + plotW / 2}" y="${height - 10}" text-anchor="middle">memory size of the process (log scale)</text>`,
    `<text transform="translate(16 ${m.top + plotH / 2}) rotate(-90)" text-anchor="middle">downtime (log scale)</text>`,
  );
  const series = [...new Set(rows.map((r) => `${r.where}|${r.strategy}`))];
  series.forEach((name, i) => {
    const [where, strategy] = name.split('|') as [Where, StrategyName];
    const mine = rows.filter((r) => r.where === where && r.strategy === strategy && r.downtimeMs > 0);
    const color = COLORS[strategy];
    const dash = where === 'kernel-lab' ? ' stroke-dasharray="6 4"' : '';
    const points = [...new Set(mine.map((r) => r.memoryBytes))]
      .sort((p, q) => p - q)
      .map((size) => {
        const atSize = mine.filter((r) => r.memoryBytes === size);
        const reference = atSize.find((r) => r.hotPercent === ref.hotPercent && r.rate === ref.rate);
        return [size, reference?.downtimeMs ?? median(atSize.map((r) => r.downtimeMs))] as const;
      });
    for (const r of mine) {
      parts.push(
        `<circle cx="${x(r.memoryBytes).toFixed(1)}" cy="${y(r.downtimeMs).toFixed(1)}" r="2.5" fill="${color}" fill-opacity="0.35"/>`,
      );
    }
    parts.push(
      `<polyline fill="none" stroke="${color}" stroke-width="2"${dash} points="${points.map(([s, d]) => `${x(s).toFixed(1)},${y(d).toFixed(1)}`).join(' ')}"/>`,
    );
    for (const [s, d] of points)
      parts.push(`<circle cx="${x(s).toFixed(1)}" cy="${y(d).toFixed(1)}" r="4" fill="${color}"/>`);
    const ly = m.top + 10 + i * 22;
    const lx = m.left + plotW + 16;
    parts.push(
      `<line x1="${lx}" x2="${lx + 28}" y1="${ly}" y2="${ly}" stroke="${color}" stroke-width="2"${dash}/>`,
      `<text x="${lx + 34}" y="${ly + 4}">${escapeXml(label(strategy, where))}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}
