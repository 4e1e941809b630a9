/**
 * The benchmark's pre-copy part, run by `npm run bench` inside the kernel
 * lab (scripts/kernel-lab), whose kernel tracks dirty memory: Ferry's
 * pre-copy and, as its baseline in the same guest and run, Ferry's
 * stop-and-copy, between two lab hosts in the guest. Prints one line
 * "BENCH-RESULT {samples, notes}".
 */
import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import { labDown, labUp, type LabHost } from '../controller/lab.js';
import { formatBytes } from '../src/units.js';
import {
  addMatrixOptions,
  describeWorkload,
  matrixFrom,
  STRATEGY_LABELS,
  workloads,
  type Sample,
  type StrategyName,
} from './bench/matrix.js';
import { bareRun, ferryRun, removeScratch } from './bench/runs.js';

const LAB = 'bnch';

const program = addMatrixOptions(new Command('bench-precopy'), {
  sizes: '64M,128M,256M',
  matrixSizes: '128M',
  hot: '1,10,50',
  rates: 'low,high',
  runs: '3',
  strategies: 'precopy,stop-and-copy',
}).description('Ferry pre-copy against stop-and-copy, in the kernel lab');

function memAvailable(): number {
  return Number(/^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0) * 1024;
}

async function main(): Promise<void> {
  program.parse();
  const matrix = matrixFrom(program.opts());
  const samples: Sample[] = [];
  const notes: string[] = [];
  await labDown(LAB);
  // Plaintext pages: CRIU's TLS under software emulation moves a few MB/s and would swamp what is measured
  // here (pre-copy against stop-and-copy, both on the same transport).
  const lab = await labUp({ name: LAB, insecure: true });
  notes.push('in the kernel lab pages travel in plaintext: CRIU’s TLS under software emulation moves a few MB/s');
  const [a, b] = lab.hosts as [LabHost, LabHost];
  try {
    for (const w of workloads(matrix)) {
      if (memAvailable() < 3 * w.memoryBytes + 256 * 2 ** 20) {
        notes.push(`kernel lab: ${describeWorkload(w)} skipped, ${formatBytes(memAvailable())} available in the guest`);
        continue;
      }
      for (let run = 1; run <= matrix.runs; run++) {
        for (let i = 0; i < matrix.strategies.length; i++) {
          const strategy = matrix.strategies[(i + run - 1) % matrix.strategies.length] as StrategyName;
          const sample =
            strategy === 'precopy' || strategy === 'stop-and-copy'
              ? await ferryRun(a, b, w, run, strategy, 'kernel-lab')
              : { ...(await bareRun(a, b, w, run, strategy === 'bare-tls')), where: 'kernel-lab' as const };
          samples.push(sample);
          process.stderr.write(
            `  [kernel lab] ${describeWorkload(w)}, run ${run}: ${STRATEGY_LABELS[strategy]}: downtime ${Math.round(sample.downtimeMs)} ms, ` +
              `total ${Math.round(sample.totalMs)} ms, ${sample.rounds} rounds, ${formatBytes(sample.bytesSent)} sent\n`,
          );
        }
      }
    }
  } finally {
    await labDown(LAB);
    removeScratch();
  }
  process.stdout.write(`BENCH-RESULT ${JSON.stringify({ samples, notes })}\n`);
}

await main();
