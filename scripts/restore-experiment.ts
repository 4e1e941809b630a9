/**
 * Why a restore is slower while the source process still exists (Ferry's
 * switchover restores while the frozen source holds its memory; the bare
 * CRIU script restores after the dump ended the source).
 *
 * The same kind of process is dumped and restored with the CRIU command
 * line between lab hosts, under four conditions, rotated:
 *
 *   source exists               dumped with --leave-running, then stopped
 *   source exists, memory warm  the same, and another process of the same size filled
 *                               its memory and ended just before the restore
 *   source ended just before    the plain dump ends it
 *   source ended earlier        the same, and the restore waits until the hypervisor
 *                               took that much memory back (free page reporting), or --wait
 *
 * If the source's presence mattered, the first two would be equally slow.
 * If what matters is whether the restore gets memory used a moment ago
 * (still backed by the hypervisor) or memory given back to it (faulted in
 * again on first touch), "memory warm" is as fast as "just ended" and
 * "ended earlier" as slow as "exists". Kernel counters over each restore
 * rule out transparent huge pages, compaction and reclaim.
 *
 *   node dist/scripts/restore-experiment.js [--size 1G] [--runs 3] [--wait 60]
 */
import { execFile } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { Command, InvalidArgumentError } from 'commander';
import { enterHost, hostEndpoint, killInHost, labDown, labUp, onHost, type LabHost } from '../controller/lab/index.js';
import { runWorkload } from '../controller/agents/index.js';
import { handedBackBytes } from '../agent/warm.js';
import { resolveCriuBinary } from '../src/criu/index.js';
import { projectRoot } from '../src/paths.js';
import { formatBytes, parseBytes } from '../src/units.js';

const execFileAsync = promisify(execFile);
const LAB = 'rexp';
const counter = join(projectRoot(), 'dist', 'examples', 'counter');

type Condition = 'exists' | 'exists-warm' | 'just-ended' | 'ended-earlier';
const CONDITIONS: readonly Condition[] = ['exists', 'exists-warm', 'just-ended', 'ended-earlier'];
const LABELS: Record<Condition, string> = {
  exists: 'source exists (stopped)',
  'exists-warm': 'source exists, memory warm',
  'just-ended': 'source ended just before',
  'ended-earlier': 'source ended earlier',
};

interface Sample {
  condition: Condition;
  run: number;
  restoreMs: number;
  /**
   * CPU time of the restored process, nearly all of it spent restoring its memory (CRIU fills it in the
   * process's own context): what the restore cost, less what other work on the machine made it wait.
   */
  cpuMs: number;
  /** /proc/vmstat over the restore, and reported_kib: memory given back to the hypervisor. */
  during: Record<string, number>;
  /** Memory given back to the hypervisor between the dump's end and the restore's start. */
  reportedBeforeKib: number | undefined;
  waitedMs: number;
}

const VMSTAT = ['pgfault', 'thp_fault_alloc', 'compact_stall', 'pgscan_direct'];
const REPORTING = '/sys/module/page_reporting/parameters';

function counters(): Record<string, number> {
  const values: Record<string, number> = {};
  for (const line of readFileSync('/proc/vmstat', 'utf8').split('\n')) {
    const [name, value] = line.split(' ');
    if (name !== undefined && VMSTAT.includes(name)) values[name] = Number(value);
  }
  const handedBack = handedBackBytes();
  if (handedBack !== undefined) values.reported_kib = handedBack / 1024;
  return values;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((x, y) => x - y);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? NaN) : ((sorted[mid - 1] ?? NaN) + (sorted[mid] ?? NaN)) / 2;
}

/** CRIU in a lab host (all its namespaces), as the agent's own CRIU runs. */
function criu(host: LabHost, args: string[]): Promise<unknown> {
  return execFileAsync('nsenter', [...enterHost(host.init), resolveCriuBinary().path, ...args]);
}

let serial = 0;

/** A counter holding `bytes` of memory on host a, once all of it is filled (it counts only after that). */
async function startCounter(a: LabHost, bytes: number): Promise<{ pid: number; home: string }> {
  const name = `rexp${++serial}`;
  const home = join(a.dataDir, 'workloads', name);
  const state = onHost(a, join(home, 'state'));
  const w = await runWorkload(
    hostEndpoint(a),
    name,
    [counter, 'state', '100', String(Math.round(bytes / 2 ** 20)), '1'],
    'restore-experiment',
  );
  for (;;) {
    const count = existsSync(state) ? Number(readFileSync(state, 'utf8').trim().split(/\s+/)[1] ?? 0) : 0;
    if (count >= 2) return { pid: w.pid ?? 0, home };
    await sleep(50);
  }
}

/** Kills this experiment's counters in a host (this lab's only workloads). */
async function killCounters(host: LabHost): Promise<void> {
  const { stdout } = await execFileAsync('ip', ['netns', 'pids', host.netns]);
  for (const pid of stdout.split(/\s+/).filter(Boolean)) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (argv[0] === counter) process.kill(Number(pid), 'SIGKILL');
    } catch {
      // gone
    }
  }
}

/** utime + stime of the (one) counter in a host, in ms. */
async function cpuOf(host: LabHost): Promise<number> {
  const { stdout } = await execFileAsync('ip', ['netns', 'pids', host.netns]);
  for (const pid of stdout.split(/\s+/).filter(Boolean)) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (argv[0] !== counter) continue;
      const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
      // Fields 14 and 15 of stat (utime, stime), counted from the state field (3), in clock ticks of 10 ms.
      return (Number(fields[11]) + Number(fields[12])) * 10;
    } catch {
      // gone
    }
  }
  return NaN;
}

async function once(a: LabHost, b: LabHost, bytes: number, condition: Condition, run: number, waitS: number) {
  const { pid, home } = await startCounter(a, bytes);
  const source = mkdtempSync(join(onHost(a, a.imagesDir), 'restore-'));
  const dir = join(b.imagesDir, basename(source));
  try {
    const keep = condition === 'exists' || condition === 'exists-warm';
    await criu(a, [
      'dump',
      '-t',
      String(pid),
      '-D',
      join(a.imagesDir, basename(source)),
      '-o',
      'dump.log',
      ...(keep ? ['--leave-running'] : []),
    ]);
    // As Ferry's source, frozen, while the destination restores.
    if (keep) await execFileAsync('nsenter', [...enterHost(a.init), 'kill', '-STOP', String(pid)]);
    // The images onto b's tmpfs, as a page server would leave them, and the files the counter holds.
    cpSync(source, onHost(b, dir), { recursive: true });
    cpSync(onHost(a, home), onHost(b, home), { recursive: true, preserveTimestamps: true });
    cpSync(onHost(a, `${home}.log`), onHost(b, `${home}.log`), { preserveTimestamps: true });
    rmSync(source, { recursive: true, force: true });
    const dumped = counters();
    const waitStarted = performance.now();
    if (condition === 'exists-warm') {
      const { pid: warm } = await startCounter(a, bytes);
      await killInHost(a, warm);
      while (existsSync(onHost(a, `/proc/${warm}`))) await sleep(10);
    } else if (condition === 'ended-earlier') {
      const deadline = Date.now() + waitS * 1000;
      while (Date.now() < deadline) {
        if (dumped.reported_kib !== undefined && ((counters().reported_kib ?? 0) - dumped.reported_kib) * 1024 >= bytes)
          break;
        await sleep(500);
      }
    }
    const waitedMs = performance.now() - waitStarted;
    const before = counters();
    const started = performance.now();
    await criu(b, ['restore', '-d', '-D', dir, '-o', 'restore.log']);
    const restoreMs = performance.now() - started;
    const after = counters();
    const cpuMs = await cpuOf(b);
    return {
      condition,
      run,
      restoreMs,
      cpuMs,
      during: Object.fromEntries(Object.entries(after).map(([k, v]) => [k, v - (before[k] ?? 0)])),
      reportedBeforeKib:
        before.reported_kib === undefined ? undefined : before.reported_kib - (dumped.reported_kib ?? 0),
      waitedMs,
    } satisfies Sample;
  } finally {
    await killCounters(b);
    await killCounters(a);
    rmSync(onHost(b, dir), { recursive: true, force: true });
  }
}

function report(samples: readonly Sample[], bytes: number, runs: number): string {
  const lines = [
    `restore of ${formatBytes(bytes)} with the CRIU command line: wall time, and CPU time of the restored process ` +
      `(median of ${runs} runs; each run wall/CPU)`,
  ];
  for (const condition of CONDITIONS) {
    const mine = samples.filter((s) => s.condition === condition);
    const m = (k: string): number => median(mine.map((s) => s.during[k] ?? 0));
    const waited =
      condition === 'ended-earlier' ? ` (${Math.round(median(mine.map((s) => s.waitedMs)) / 1000)} s)` : '';
    const reported = mine.some((s) => s.reportedBeforeKib !== undefined)
      ? `; given back to the hypervisor before it ${formatBytes(median(mine.map((s) => s.reportedBeforeKib ?? 0)) * 1024)}`
      : '';
    lines.push(
      `  ${`${LABELS[condition]}${waited}`.padEnd(34)}${`${Math.round(median(mine.map((s) => s.restoreMs)))} ms`.padStart(9)}` +
        `${`CPU ${Math.round(median(mine.map((s) => s.cpuMs)))} ms`.padStart(12)}` +
        `  (runs ${mine.map((s) => `${Math.round(s.restoreMs)}/${Math.round(s.cpuMs)}`).join(', ')}; page faults ${m('pgfault')}, THP faults ${m('thp_fault_alloc')}, ` +
        `compaction stalls ${m('compact_stall')}, direct reclaim scans ${m('pgscan_direct')}${reported})`,
    );
  }
  const reporting = existsSync(REPORTING)
    ? readdirSync(REPORTING)
        .map((p) => `${p}=${readFileSync(join(REPORTING, p), 'utf8').trim()}`)
        .join(' ')
    : undefined;
  lines.push(
    reporting === undefined
      ? 'this kernel does not give free memory back to a hypervisor'
      : `this kernel gives free memory back to its hypervisor (virtio free page reporting: ${reporting})`,
    `load average ${readFileSync('/proc/loadavg', 'utf8').trim()}`,
  );
  return lines.join('\n');
}

function size(value: string): number {
  const bytes = parseBytes(value);
  if (bytes === undefined || bytes < 16 * 2 ** 20) throw new InvalidArgumentError('a size of 16M or more');
  return bytes;
}

function whole(value: string): number {
  if (!/^\d+$/.test(value) || Number(value) < 1) throw new InvalidArgumentError('a whole number from 1');
  return Number(value);
}

async function main(): Promise<void> {
  const opts = new Command('restore-experiment')
    .option('--size <SIZE>', 'memory of the process', size, 2 ** 30)
    .option('--runs <N>', 'runs of each condition', whole, 3)
    .option('--wait <S>', 'most seconds "ended earlier" waits for the hypervisor to take the memory back', whole, 60)
    .parse()
    .opts<{ size: number; runs: number; wait: number }>();
  if (process.getuid?.() !== 0) throw new Error('runs CRIU and lab hosts: run it as root');
  await labDown(LAB);
  const lab = await labUp({ name: LAB });
  const [a, b] = lab.hosts as [LabHost, LabHost];
  const samples: Sample[] = [];
  try {
    for (let run = 1; run <= opts.runs; run++) {
      for (let i = 0; i < CONDITIONS.length; i++) {
        // Rotated, so that no condition always follows the same one.
        const condition = CONDITIONS[(i + run - 1) % CONDITIONS.length] as Condition;
        const sample = await once(a, b, opts.size, condition, run, opts.wait);
        samples.push(sample);
        process.stderr.write(`  run ${run}, ${LABELS[condition]}: ${Math.round(sample.restoreMs)} ms\n`);
        await sleep(1000);
      }
    }
  } finally {
    await labDown(LAB);
  }
  process.stdout.write(`${report(samples, opts.size, opts.runs)}\n`);
}

await main();
