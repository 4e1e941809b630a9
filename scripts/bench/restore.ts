/**
 * Why a restore is slower while the source process still exists. The same
 * images are restored (with the CRIU command line) with the source stopped
 * but present; with the source stopped and, just before, another process
 * of the same size filled and ended (recently used memory on the free
 * lists); right after the source ended; and once the hypervisor has taken
 * the source's memory back (free page reporting), or a while after. If the
 * source's presence itself mattered, "stopped" and "stopped, memory warm"
 * would be equally slow; if what matters is whether the restore gets memory
 * that was used just before, "stopped, memory warm" is as fast as "just
 * ended".
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import type { LabHost } from '../../controller/lab.js';
import { resolveCriuBinary } from '../../src/criu/index.js';
import { formatBytes } from '../../src/units.js';
import { median } from './matrix.js';
import { killWorkloads, startWorkload } from './runs.js';

const execFileAsync = promisify(execFile);

export type RestoreCondition = 'source-stopped' | 'source-stopped-warm' | 'source-just-ended' | 'source-ended-earlier';

const CONDITIONS: readonly RestoreCondition[] = [
  'source-stopped',
  'source-stopped-warm',
  'source-just-ended',
  'source-ended-earlier',
];

export const CONDITION_LABELS: Record<RestoreCondition, string> = {
  'source-stopped': 'source exists (stopped)',
  'source-stopped-warm': 'source exists, memory warm',
  'source-just-ended': 'source ended just before',
  'source-ended-earlier': 'source ended earlier',
};

export interface RestoreSample {
  condition: RestoreCondition;
  memoryBytes: number;
  run: number;
  restoreMs: number;
  /** Kernel counters over the restore (/proc/vmstat), and what free page reporting gave back to the hypervisor. */
  vmstat: Record<string, number>;
  /** Free memory given back to the hypervisor between the dump's end and the restore's start. */
  reportedBeforeKib: number | undefined;
  /** Between the dump's end and the restore's start. */
  waitedMs: number;
}

const VMSTAT_KEYS = ['pgfault', 'thp_fault_alloc', 'compact_stall', 'pgscan_direct', 'allocstall_normal'];
const REPORTED = '/sys/module/page_reporting/parameters/reported_kib';

function counters(): Record<string, number> {
  const values: Record<string, number> = {};
  for (const line of readFileSync('/proc/vmstat', 'utf8').split('\n')) {
    const [name, value] = line.split(' ');
    if (name !== undefined && VMSTAT_KEYS.includes(name)) values[name] = Number(value);
  }
  if (existsSync(REPORTED)) values.reported_kib = Number(readFileSync(REPORTED, 'utf8').trim());
  return values;
}

function delta(before: Record<string, number>, after: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(after).map(([k, v]) => [k, v - (before[k] ?? 0)]));
}

function inHost(host: LabHost, args: string[]): string[] {
  return ['-t', String(host.pid), '-n', '-m', '--', resolveCriuBinary().path, ...args];
}

async function once(
  a: LabHost,
  b: LabHost,
  memoryBytes: number,
  condition: RestoreCondition,
  run: number,
  waitS: number,
): Promise<RestoreSample> {
  const workload = { memoryBytes, hotPercent: 1, rate: 'low' as const };
  const { pid } = await startWorkload(a, workload);
  const dir = mkdtempSync(join(b.imagesDir, 'restore-'));
  try {
    // Images straight onto b's tmpfs, as a page server would leave them.
    const keep = condition === 'source-stopped' || condition === 'source-stopped-warm';
    await execFileAsync(
      'nsenter',
      inHost(a, ['dump', '-t', String(pid), '-D', dir, '-o', 'dump.log', ...(keep ? ['--leave-running'] : [])]),
    );
    if (keep) process.kill(pid, 'SIGSTOP'); // frozen, as Ferry's source is while the destination restores
    const dumped = counters();
    const waitStarted = performance.now();
    if (condition === 'source-stopped-warm') {
      // As much memory as the restore needs, filled and freed: the restore can take pages used a moment ago.
      const { pid: warm } = await startWorkload(a, workload);
      process.kill(warm, 'SIGKILL');
      while (existsSync(`/proc/${warm}`)) await sleep(10);
    }
    if (condition === 'source-ended-earlier') {
      const deadline = Date.now() + waitS * 1000;
      while (Date.now() < deadline) {
        const reported = (counters().reported_kib ?? 0) - (dumped.reported_kib ?? 0);
        if (dumped.reported_kib !== undefined && reported * 1024 >= memoryBytes) break;
        await sleep(500);
      }
    }
    const waitedMs = performance.now() - waitStarted;
    const before = counters();
    const started = performance.now();
    await execFileAsync('nsenter', inHost(b, ['restore', '-d', '-D', dir, '-o', 'restore.log']));
    const restoreMs = performance.now() - started;
    const reportedBeforeKib =
      before.reported_kib === undefined ? undefined : before.reported_kib - (dumped.reported_kib ?? 0);
    return {
      condition,
      memoryBytes,
      run,
      restoreMs,
      vmstat: delta(before, counters()),
      reportedBeforeKib,
      waitedMs,
    };
  } finally {
    await killWorkloads(b);
    await killWorkloads(a);
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function restoreExperiment(
  a: LabHost,
  b: LabHost,
  memoryBytes: number,
  runs: number,
  waitS: number,
  onSample: (s: RestoreSample) => void,
): Promise<RestoreSample[]> {
  const samples: RestoreSample[] = [];
  for (let run = 1; run <= runs; run++) {
    // Rotated, so that no condition always follows the same one.
    for (let i = 0; i < CONDITIONS.length; i++) {
      const condition = CONDITIONS[(i + run - 1) % CONDITIONS.length] as RestoreCondition;
      const sample = await once(a, b, memoryBytes, condition, run, waitS);
      samples.push(sample);
      onSample(sample);
      await sleep(1000);
    }
  }
  return samples;
}

export function restoreTable(samples: readonly RestoreSample[]): string {
  const lines = [
    `Restore of ${formatBytes(samples[0]?.memoryBytes ?? 0)} with the CRIU command line, by what happened to the source ` +
      `(median of ${Math.max(...samples.map((s) => s.run))} runs)`,
  ];
  for (const condition of CONDITIONS) {
    const mine = samples.filter((s) => s.condition === condition);
    if (mine.length === 0) continue;
    const m = (k: string): number => median(mine.map((s) => s.vmstat[k] ?? 0));
    const waited =
      condition === 'source-ended-earlier' ? ` (${(median(mine.map((s) => s.waitedMs)) / 1000).toFixed(0)} s)` : '';
    const reported = mine.some((s) => s.reportedBeforeKib !== undefined)
      ? `; memory given back to the hypervisor before the restore ${formatBytes(median(mine.map((s) => s.reportedBeforeKib ?? 0)) * 1024)}, during it ${formatBytes(m('reported_kib') * 1024)}`
      : '';
    lines.push(
      `  ${`${CONDITION_LABELS[condition]}${waited}`.padEnd(32)}${`${Math.round(median(mine.map((s) => s.restoreMs)))} ms`.padStart(9)}` +
        `   (page faults ${m('pgfault')}, THP faults ${m('thp_fault_alloc')}, compaction stalls ${m('compact_stall')}, ` +
        `direct reclaim scans ${m('pgscan_direct')}${reported})`,
    );
  }
  return lines.join('\n');
}

/** Whether this machine's kernel gives free memory back to its hypervisor (virtio free page reporting). */
export function pageReporting(): string | undefined {
  const dir = '/sys/module/page_reporting/parameters';
  if (!existsSync(dir)) return undefined;
  return readdirSync(dir)
    .map((p) => `${p}=${readFileSync(join(dir, p), 'utf8').trim()}`)
    .join(' ');
}
