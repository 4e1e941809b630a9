/**
 * Ferry's page rate, plain against encrypted: the same stop-and-copy of a
 * fresh counter between two lab hosts, with --plain-pages and with the
 * agents' TLS (the default), alternating. The rate is the final dump's
 * pages over the time from the freeze until the source held the dump, less
 * the streaming of the other images: what CRIU's dump and the page stream
 * took together, the part TLS can slow down.
 *
 * Part of `npm run bench`; on its own (after `npm run build`):
 *
 *   node dist/scripts/bench-pages.js [--size 1024] [--runs 3]
 */
import { pathToFileURL } from 'node:url';
import { Command, InvalidArgumentError } from 'commander';
import { hostEndpoint, killInHost, labDown, labUp, type LabHost } from '../controller/lab/index.js';
import { migrate } from '../controller/migration/index.js';
import { handedBackBytes } from '../agent/warm.js';
import { formatBytes } from '../src/units.js';
import { median, startWorkload } from './bench-matrix.js';

/** One stop-and-copy: its pages and how long the dump with its page stream took. */
interface PageSample {
  bytes: number;
  ms: number;
  downtimeMs: number;
  /** Memory this machine handed back to its hypervisor during the migration (free page reporting), if it says. */
  reportedBytes: number | undefined;
}

export interface PageRates {
  memoryMb: number;
  runs: number;
  plain: PageSample[];
  tls: PageSample[];
  /** Bytes per second, medians. */
  plainRate: number;
  tlsRate: number;
  /** The median of each run's TLS rate over its plain one (the two ran one after the other). */
  ratio: number;
}

export async function pageRates(
  a: LabHost,
  b: LabHost,
  memoryMb: number,
  runs: number,
  progress: (line: string) => void = () => undefined,
): Promise<PageRates> {
  const samples: Record<'plain' | 'tls', PageSample[]> = { plain: [], tls: [] };
  let serial = 0;
  const once = async (mode: 'plain' | 'tls'): Promise<PageSample> => {
    const name = `pages${serial++}`;
    await startWorkload(
      a,
      name,
      { memoryMb, hotPercent: 1, hotMb: 10, rate: 'low', tickMs: 200 },
      {
        minMs: 1000,
        msPerMib: 3,
      },
    );
    const before = handedBackBytes();
    const report = await migrate({
      workload: name,
      from: hostEndpoint(a),
      to: hostEndpoint(b),
      plainPages: mode === 'plain',
      softwareVersion: 'bench',
    });
    await killInHost(b, report.to.pid);
    const after = handedBackBytes();
    const f = report.final;
    return {
      bytes: f.bytes,
      ms: f.heldMs - f.streamMs,
      downtimeMs: report.downtimeMs,
      reportedBytes: before === undefined || after === undefined ? undefined : after - before,
    };
  };
  // Not counted: the first migration of a size takes memory the machine may have handed back to its
  // hypervisor, slow on first touch (docs/benchmark.md), and was seen at a third of the rate.
  const warm = await once('tls');
  progress(`  warm-up: ${formatBytes(warm.bytes)} in ${Math.round(warm.ms)} ms (not counted)`);
  for (let run = 0; run < runs; run++) {
    // Alternating, and the order turned each run, so drift on the machine falls on both.
    const order = run % 2 === 0 ? (['plain', 'tls'] as const) : (['tls', 'plain'] as const);
    for (const mode of order) {
      const sample = await once(mode);
      samples[mode].push(sample);
      const reported =
        sample.reportedBytes === undefined ? '' : `, ${formatBytes(sample.reportedBytes)} handed to the hypervisor`;
      progress(
        `  run ${run + 1} pages ${mode}: ${formatBytes(sample.bytes)} in ${Math.round(sample.ms)} ms ` +
          `(${formatBytes((sample.bytes / sample.ms) * 1000)}/s), downtime ${sample.downtimeMs} ms${reported}`,
      );
    }
  }
  const rate = (x: PageSample): number => (x.bytes / x.ms) * 1000;
  const rateOf = (s: PageSample[]): number => median(s.map(rate));
  return {
    memoryMb,
    runs,
    ...samples,
    plainRate: rateOf(samples.plain),
    tlsRate: rateOf(samples.tls),
    ratio: median(samples.tls.map((t, i) => rate(t) / rate(samples.plain[i] ?? t))),
  };
}

export function describePageRates(r: PageRates): string {
  const downtime = (s: PageSample[]): number => median(s.map((x) => x.downtimeMs));
  return [
    `Ferry's page rate, ${r.memoryMb} MiB stop-and-copy (median of ${r.runs}, dump and page stream together)`,
    `  plain (--plain-pages)  ${formatBytes(r.plainRate)}/s   downtime ${Math.round(downtime(r.plain))} ms`,
    `  TLS (the default)      ${formatBytes(r.tlsRate)}/s   downtime ${Math.round(downtime(r.tls))} ms`,
    `  encrypted against plain: ${(r.tlsRate / r.plainRate).toFixed(2)}× of the medians, ` +
      `${r.ratio.toFixed(2)}× the median of each run's pair (target at least 0.80×)`,
  ].join('\n');
}

const LAB = 'fpages';

async function main(): Promise<void> {
  const positive = (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError('a whole number above 0');
    return n;
  };
  const options = new Command('bench-pages')
    .description("Ferry's page rate between two lab hosts, plain pages against the agents' TLS")
    .option('--size <MiB>', "the counter's memory", positive, 1024)
    .option('--runs <n>', 'runs of each', positive, 3)
    .parse()
    .opts<{ size: number; runs: number }>();
  await labDown(LAB);
  const lab = await labUp({ name: LAB });
  try {
    const [a, b] = lab.hosts as [LabHost, LabHost];
    const rates = await pageRates(a, b, options.size, options.runs, (line) => process.stderr.write(`${line}\n`));
    process.stdout.write(`${describePageRates(rates)}\n`);
  } finally {
    await labDown(LAB);
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) await main();
