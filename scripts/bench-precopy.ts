/**
 * The pre-copy half of `npm run bench`, run inside the kernel lab (a kernel
 * that tracks dirty memory): Ferry pre-copy and Ferry stop-and-copy on the
 * same workloads in the same guest. Prints one "BENCH-SAMPLE {json}" line
 * per migration; scripts/bench.ts collects them.
 *
 * Environment: BENCH_KL_SIZES (MiB, "64,256"), BENCH_HOT (percent, "1,10,50"),
 * BENCH_KL_RATES ("high": under emulation every run is slow), BENCH_KL_RUNS (1).
 */
import { hostEndpoint, killInHost, labDown, labUp, type LabHost } from '../controller/lab/index.js';
import { migrate, type Strategy } from '../controller/migration/index.js';
import { cells, sampleOf, startWorkload, type Cell } from './bench-matrix.js';

const sizes = (process.env.BENCH_KL_SIZES ?? '64,256').split(',').map(Number);
const runs = Number(process.env.BENCH_KL_RUNS ?? 1);

async function one(a: LabHost, b: LabHost, cell: Cell, strategy: Strategy, run: number): Promise<void> {
  const name = `${strategy === 'precopy' ? 'pc' : 'sc'}${cell.memoryMb}h${cell.hotPercent}${cell.rate}${run}`;
  const w = await startWorkload(a, name, cell, { minMs: 2000, msPerMib: 20 });
  try {
    const report = await migrate({
      workload: name,
      from: hostEndpoint(a),
      to: hostEndpoint(b),
      strategy,
      softwareVersion: 'bench',
    });
    await killInHost(b, report.to.pid);
    process.stdout.write(
      `BENCH-SAMPLE ${JSON.stringify(sampleOf(cell, `Ferry ${strategy} (kernel lab)`, run, report))}\n`,
    );
  } catch (error) {
    process.stderr.write(`bench: ${name} failed: ${(error as Error).message}\n`);
    await killInHost(a, w.pid);
  }
}

async function main(): Promise<void> {
  process.env.BENCH_RATES = process.env.BENCH_KL_RATES ?? 'high';
  const lab = await labUp({ name: 'klbench', agentStartMs: 180_000 });
  const [a, b] = lab.hosts as [LabHost, LabHost];
  try {
    for (const cell of cells(sizes)) {
      for (let run = 0; run < runs; run++) {
        await one(a, b, cell, 'precopy', run);
        await one(a, b, cell, 'stop-and-copy', run);
      }
    }
  } finally {
    await labDown('klbench');
  }
}

await main();
