/**
 * Runs inside the kernel lab (scripts/kernel-lab), on a kernel that tracks
 * dirty memory: two Ferry lab hosts in the guest, and the migrations the
 * pre-copy tests check. Prints one line "KERNEL-LAB-RESULT {json}".
 *
 *   converging   256 MiB, 16 MiB rewritten continuously: pre-copy
 *   baseline     the same workload, stop-and-copy, for the downtime comparison
 *   racing       256 MiB rewritten as fast as it can: rounds must stop (not converging)
 *   strict       64 MiB rewritten as fast as it can, --strict-downtime: Ferry must
 *                abort over the budget and leave the process running on a
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { hostEndpoint, killInHost, labDown, labUp, onHost, type LabHost } from '../controller/lab/index.js';
import { migrate, type MigrationReport, type Strategy } from '../controller/migration/index.js';
import { runWorkload } from '../controller/agents/index.js';
import { readCounterState } from '../src/counter.js';
import { projectRoot } from '../src/paths.js';

interface Scenario {
  name: string;
  strategy: Strategy;
  memoryMb: number;
  hotMb: number;
  tickMs: number;
  strictDowntime?: boolean;
}

interface Outcome {
  scenario: Scenario;
  /** Null when the migration failed (see failure). */
  report: MigrationReport | null;
  failure?: { code: string; message: string };
  /** After a failure: the process still counts on the source. */
  runsOnSource?: boolean;
  countBefore: number;
  countAfter: number;
  /** The restored process runs, on the destination host. */
  runsOnDestination: boolean;
  sourceGone: boolean;
}

const scenarios: Scenario[] = [
  { name: 'converging', strategy: 'precopy', memoryMb: 256, hotMb: 16, tickMs: 20 },
  { name: 'baseline', strategy: 'stop-and-copy', memoryMb: 256, hotMb: 16, tickMs: 20 },
  { name: 'racing', strategy: 'precopy', memoryMb: 256, hotMb: 256, tickMs: 0 },
  { name: 'strict', strategy: 'precopy', memoryMb: 64, hotMb: 64, tickMs: 0, strictDowntime: true },
  // Post-copy works here as it is: root in the guest has CAP_SYS_RESOURCE (docs/postcopy.md).
  { name: 'postcopy', strategy: 'postcopy', memoryMb: 64, hotMb: 1, tickMs: 20 },
];

/**
 * The counter's count. It rewrites its state file in place, so a read can
 * land between the truncate and the write (that read an empty file once,
 * and reported the count as null): read again until the file is whole.
 */
function count(host: LabHost, workload: string): number {
  const stateFile = onHost(host, join(host.dataDir, 'workloads', workload, 'state'));
  for (let attempt = 0; attempt < 100; attempt++) {
    const state = readCounterState(stateFile);
    if (state !== undefined) return state.count;
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10);
  }
  throw new Error(`the counter's state file ${stateFile} stayed empty for a second`);
}

/** The host (its own /proc) runs the PID. */
const runsOn = (host: LabHost, pid: number): boolean => existsSync(onHost(host, `/proc/${pid}`));

async function main(): Promise<void> {
  // Under emulation, while the machine also runs the rest of the suite, an agent once took
  // over 30 s to answer (its node and CRIU starting at a few MIPS).
  const lab = await labUp({ name: 'kl', agentStartMs: 180_000 });
  const [a, b] = lab.hosts;
  if (a === undefined || b === undefined) throw new Error('the lab has fewer than two hosts');
  const counter = join(projectRoot(), 'dist', 'examples', 'counter');
  const outcomes: Outcome[] = [];
  try {
    for (const scenario of scenarios) {
      // Its state file in its own directory, which moves with it.
      const w = await runWorkload(
        hostEndpoint(a),
        scenario.name,
        [counter, 'state', String(scenario.tickMs), String(scenario.memoryMb), String(scenario.hotMb)],
        'kernel-lab',
      );
      const source = w.pid ?? 0;
      // Let it fault in all of its memory first.
      await sleep(3000);
      const countBefore = count(a, scenario.name);
      let report: MigrationReport;
      try {
        report = await migrate({
          workload: scenario.name,
          from: hostEndpoint(a),
          to: hostEndpoint(b),
          strategy: scenario.strategy,
          strictDowntime: scenario.strictDowntime,
          softwareVersion: 'kernel-lab',
          onEvent: (e) => process.stderr.write(`[${scenario.name}] ${e.phase} ${e.from}: ${e.message}\n`),
        });
      } catch (error) {
        const failed = count(a, scenario.name);
        await sleep(1000);
        outcomes.push({
          scenario,
          report: null,
          failure: { code: (error as { code?: string }).code ?? '', message: (error as Error).message },
          countBefore,
          countAfter: count(a, scenario.name),
          runsOnSource: count(a, scenario.name) > failed && runsOn(a, source),
          runsOnDestination: false,
          sourceGone: !runsOn(a, source),
        });
        await killInHost(a, source);
        continue;
      }
      const pid = report.to.pid;
      const frozen = count(b, scenario.name);
      await sleep(1000);
      const countAfter = count(b, scenario.name);
      outcomes.push({
        scenario,
        report,
        countBefore,
        countAfter,
        runsOnDestination: countAfter > frozen && runsOn(b, pid),
        sourceGone: !runsOn(a, source),
      });
      await killInHost(b, pid);
    }
  } finally {
    await labDown('kl');
  }
  process.stdout.write(`KERNEL-LAB-RESULT ${JSON.stringify(outcomes)}\n`);
}

await main();
