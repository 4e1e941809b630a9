/**
 * npm run bench: live migration downtime, total time and traffic for a matrix
 * of workloads (memory size, hot set, dirty rate), in one run on this host:
 *
 *   bare CRIU script        dump → page server → copy images → restore, the CRIU command
 *                           line and nothing else, plain and with CRIU's TLS (Ferry's default)
 *   Ferry stop-and-copy     between the same two lab hosts, same workloads
 *   Ferry pre-copy          in the kernel lab (this kernel cannot track dirty memory), with
 *                           Ferry's stop-and-copy in the same guest as its baseline
 *
 * then where Ferry's stop-and-copy downtime goes against the bare script's,
 * and why restores are slower while the source still exists. Prints a
 * table; writes CSV files and an SVG plot under bench-results/. Options:
 * --help (each also from a BENCH_* variable).
 */
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { Command, Option } from 'commander';
import { labDown, labUp, type LabHost } from '../controller/lab.js';
import { projectRoot } from '../src/paths.js';
import { formatBytes, formatDuration } from '../src/units.js';
import {
  addMatrixOptions,
  describeWorkload,
  matrixFrom,
  parseSizes,
  reference,
  runCount,
  STRATEGY_LABELS,
  workloads,
  type MatrixOptions,
  type Sample,
  type StrategyName,
} from './bench/matrix.js';
import { downtimePlot, overhead, resultsTable, runsCsv, summarize, summaryCsv } from './bench/report.js';
import { pageReporting, restoreExperiment, restoreTable, type RestoreSample } from './bench/restore.js';
import { bareRun, ferryRun, removeScratch } from './bench/runs.js';

const LAB = 'bnch';
const GiB = 2 ** 30;

interface Options {
  sizes: string;
  matrixSizes: string;
  hot: string;
  rates: string;
  runs: string;
  strategies: string;
  guestSizes: string;
  guestMatrixSizes: string;
  guestRuns: string;
  restoreRuns: string;
  restoreWait: string;
  out: string;
  kernelLabTimeout: string;
}

const program = addMatrixOptions(new Command('bench'), {
  sizes: '256M,1G,4G',
  matrixSizes: '256M,1G',
  hot: '1,10,50',
  rates: 'low,high',
  runs: '3',
  strategies: 'bare,bare-tls,stop-and-copy,precopy',
})
  .description('Ferry against a bare CRIU script, and pre-copy against stop-and-copy, on a matrix of workloads')
  .addOption(
    new Option('--guest-sizes <LIST>', 'memory sizes for the kernel lab (emulated, slow)')
      .env('BENCH_GUEST_SIZES')
      .default('64M,128M,256M'),
  )
  .addOption(
    new Option('--guest-matrix-sizes <LIST>', 'kernel-lab sizes that run every hot set and dirty rate')
      .env('BENCH_GUEST_MATRIX_SIZES')
      .default('128M'),
  )
  .addOption(new Option('--guest-runs <N>', 'runs in the kernel lab').env('BENCH_GUEST_RUNS').default('3'))
  .addOption(
    new Option('--restore-runs <N>', 'runs of the restore experiment (0: skip it)')
      .env('BENCH_RESTORE_RUNS')
      .default('3'),
  )
  .addOption(
    new Option(
      '--restore-wait <S>',
      'most seconds the late restore waits for the hypervisor to take back the source’s memory',
    )
      .env('BENCH_RESTORE_WAIT')
      .default('30'),
  )
  .addOption(
    new Option('--out <DIR>', 'where to write results (default: bench-results/TIME)').env('BENCH_OUT').default(''),
  )
  .addOption(
    new Option('--kernel-lab-timeout <S>', 'give up on the kernel lab after this long')
      .env('BENCH_KERNEL_LAB_TIMEOUT')
      .default('5400'),
  )
  .addHelpText(
    'after',
    `
Lists are comma-separated: --sizes 256M,1G --hot 10 --rates low --runs 1.
A size is skipped, with a note, when the machine has too little free memory
for it: a migration holds the source, its images (tmpfs, so RAM) and the
restored copy at once.`,
  );

function mib(bytes: number): string {
  return `${Math.round(bytes / 2 ** 20)}M`;
}

function loadAverage(): string {
  return readFileSync('/proc/loadavg', 'utf8').split(' ')[0] ?? '?';
}

function log(line: string): void {
  process.stderr.write(`${line}\n`);
}

function memAvailable(): number {
  const match = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
  return Number(match?.[1] ?? 0) * 1024;
}

/** Source, images and restored copy at once, and room for everything else. */
function memoryNeeded(size: number): number {
  return 3 * size + 2 * GiB;
}

async function labRuns(
  matrix: MatrixOptions,
  notes: string[],
  samples: Sample[],
  restore: { runs: number; waitS: number; restored: RestoreSample[] },
): Promise<void> {
  const strategies = matrix.strategies.filter((s) => s !== 'precopy');
  if (strategies.length === 0 && restore.runs === 0) return;
  await labDown(LAB);
  const lab = await labUp({ name: LAB });
  const [a, b] = lab.hosts as [LabHost, LabHost];
  try {
    const skipped = new Set<number>();
    for (const w of workloads(matrix)) {
      if (strategies.length === 0) break;
      if (skipped.has(w.memoryBytes)) continue;
      const free = memAvailable();
      if (free < memoryNeeded(w.memoryBytes)) {
        skipped.add(w.memoryBytes);
        notes.push(
          `${formatBytes(w.memoryBytes)} skipped: ${formatBytes(free)} of memory available, a migration of it needs about ${formatBytes(memoryNeeded(w.memoryBytes))} (source, images on tmpfs, restored copy)`,
        );
        log(`bench: ${notes.at(-1)}`);
        continue;
      }
      for (let run = 1; run <= matrix.runs; run++) {
        // Rotated, so that no strategy always runs first or right after another.
        for (let i = 0; i < strategies.length; i++) {
          const strategy = strategies[(i + run - 1) % strategies.length] as StrategyName;
          const sample =
            strategy === 'stop-and-copy'
              ? await ferryRun(a, b, w, run, 'stop-and-copy', 'lab')
              : await bareRun(a, b, w, run, strategy === 'bare-tls');
          samples.push(sample);
          log(
            `  ${describeWorkload(w)}, run ${run}: ${STRATEGY_LABELS[strategy]}: downtime ${Math.round(sample.downtimeMs)} ms, total ${Math.round(sample.totalMs)} ms ` +
              `(${Object.entries(sample.parts)
                .map(([k, v]) => `${k} ${Math.round(v)}`)
                .join(', ')})`,
          );
        }
      }
    }
    if (restore.runs > 0) {
      const sizes = matrix.sizes.filter((s) => !skipped.has(s) && memAvailable() > memoryNeeded(s));
      const size = sizes.includes(GiB) ? GiB : (sizes.filter((s) => s <= GiB).at(-1) ?? sizes[0]);
      if (size !== undefined) {
        log(`bench: restore experiment, ${formatBytes(size)}, ${restore.runs} runs`);
        restore.restored.push(
          ...(await restoreExperiment(a, b, size, restore.runs, restore.waitS, (s) =>
            log(`  restore, ${s.condition}, run ${s.run}: ${Math.round(s.restoreMs)} ms`),
          )),
        );
      }
    }
  } finally {
    await labDown(LAB);
    removeScratch();
  }
}

/** Ferry's pre-copy and stop-and-copy in the kernel lab: its own run of the bench, in a qemu guest. */
async function kernelLabRuns(
  matrix: MatrixOptions,
  guest: { sizes: number[]; matrixSizes: number[]; runs: number },
  timeoutS: number,
  notes: string[],
): Promise<Sample[]> {
  const args = [
    join(projectRoot(), 'scripts', 'kernel-lab'),
    '--timeout',
    String(timeoutS),
    '--',
    'node',
    'dist/scripts/bench-precopy.js',
    '--sizes',
    guest.sizes.map(mib).join(','),
    '--matrix-sizes',
    guest.matrixSizes.map(mib).join(','),
    '--hot',
    matrix.hot.join(','),
    '--rates',
    matrix.rates.join(','),
    '--runs',
    String(guest.runs),
  ];
  const child = spawn('bash', args, { stdio: ['ignore', 'pipe', 'inherit'] });
  let result: string | undefined;
  // The guest's console, line by line: progress goes on to stderr, the result line is kept.
  createInterface({ input: child.stdout }).on('line', (line) => {
    if (line.startsWith('BENCH-RESULT ')) result = line;
    else if (line.trim() !== '') log(line);
  });
  const code = await new Promise<number>((resolve) => child.once('close', (c) => resolve(c ?? 1)));
  if (result === undefined) {
    notes.push(`pre-copy: the kernel lab ended (exit ${code}) without results; its output is above`);
    return [];
  }
  const parsed = JSON.parse(result.slice('BENCH-RESULT '.length)) as { samples: Sample[]; notes: string[] };
  notes.push(...parsed.notes);
  return parsed.samples;
}

async function main(): Promise<void> {
  program.parse();
  const opts = program.opts<Options>();
  const matrix = matrixFrom(opts);
  const guestSizes = parseSizes(opts.guestSizes);
  const guest = {
    sizes: guestSizes,
    matrixSizes: opts.guestMatrixSizes === 'all' ? guestSizes : parseSizes(opts.guestMatrixSizes),
    runs: runCount(opts.guestRuns),
  };
  const restoreRuns = opts.restoreRuns === '0' ? 0 : runCount(opts.restoreRuns);
  const restoreWaitS = Number(opts.restoreWait);
  if (process.getuid?.() !== 0) throw new Error('the bench runs CRIU and lab hosts: run it as root');

  const started = Date.now();
  const loadBefore = loadAverage();
  const stamp = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  const out = opts.out || join(projectRoot(), 'bench-results', stamp);
  mkdirSync(out, { recursive: true });
  const onHost = matrix.strategies.filter((s) => s !== 'precopy');
  const shape = `hot ${matrix.hot.join(', ')} %; dirty rate ${matrix.rates.join(', ')}`;
  if (onHost.length > 0)
    log(
      `bench: ${onHost.join(', ')} between lab hosts a → b, memory ${matrix.sizes.map(formatBytes).join(', ')} ` +
        `(every hot set and rate at ${matrix.matrixSizes.map(formatBytes).join(', ')}); ${shape}; ${matrix.runs} runs`,
    );
  if (matrix.strategies.includes('precopy'))
    log(
      `bench: pre-copy and stop-and-copy in the kernel lab, memory ${guest.sizes.map(formatBytes).join(', ')} ` +
        `(every hot set and rate at ${guest.matrixSizes.map(formatBytes).join(', ')}); ${shape}; ${guest.runs} runs`,
    );
  const notes: string[] = [];
  const samples: Sample[] = [];
  const restore = { runs: restoreRuns, waitS: restoreWaitS, restored: [] as RestoreSample[] };
  await labRuns(matrix, notes, samples, restore);
  if (matrix.strategies.includes('precopy')) {
    log('bench: pre-copy in the kernel lab (a qemu guest under software emulation; slow)');
    samples.push(...(await kernelLabRuns(matrix, guest, Number(opts.kernelLabTimeout), notes)));
  }

  const rows = summarize(samples);
  const ref = reference(matrix);
  const sections: string[] = [];
  sections.push(
    `Downtime (source frozen → running on the destination), total time and bytes sent (pages and other images), ` +
      `median of the runs; rounds = copies of memory, the final one included. Sizes outside the matrix run ` +
      `hot ${ref.hotPercent} %, ${ref.rate} dirty rate only. ` +
      `Lab: two lab hosts on this machine. Kernel lab: a qemu guest under software emulation, ` +
      `comparable only within itself.\n\n${resultsTable(rows)}`,
  );
  for (const where of ['lab', 'kernel-lab'] as const) {
    if (!samples.some((s) => s.where === where && s.strategy === 'stop-and-copy')) continue;
    const { text, ratios } = overhead(samples, where);
    if (where === 'lab' && samples.some((s) => s.strategy === 'bare-tls')) {
      const verdicts = [...ratios.entries()].map(
        ([size, r]) =>
          `${formatBytes(size)} ${r <= 1.15 ? 'within' : 'over'} 15 % (${r >= 1 ? '+' : ''}${Math.round((r - 1) * 100)} %)`,
      );
      sections.push(
        `Overhead: Ferry stop-and-copy against the bare CRIU script with TLS, downtime split into steps ` +
          `(medians over every run of a size). Bare: dump = CRIU freezing and dumping (pages to the page server), ` +
          `copy = the other images to b, restore = criu restore; startup = CRIU starting before the freeze, ` +
          `outside the downtime. Ferry: dump (source agent, freeze → dump written), stream (images agent to agent), ` +
          `restore (destination agent, up to the held copy), commit (the source's CRIU ends its copy), resume ` +
          `(destination lets its copy run), protocol = the rest of the downtime: messages and round trips between ` +
          `the steps; preflight is before the freeze.\n\n${text}\n\nGoal, Ferry within 15 % of the bare script with TLS: ${verdicts.join('; ')}`,
      );
    } else if (where === 'kernel-lab') {
      sections.push(`Kernel lab: where Ferry's stop-and-copy downtime goes\n\n${text}`);
    }
  }
  if (restore.restored.length > 0) {
    const reporting = pageReporting();
    sections.push(
      `${restoreTable(restore.restored)}\n` +
        (reporting === undefined
          ? 'This kernel does not report free memory to a hypervisor.'
          : `This kernel reports free memory to its hypervisor (virtio free page reporting: ${reporting}).`),
    );
  }
  notes.push(
    `load average (1 min) ${loadBefore} at the start, ${loadAverage()} at the end, on ${availableParallelism()} CPUs: ` +
      'other work on the machine slows the runs it overlaps',
  );
  sections.push(`Notes\n${notes.map((n) => `  - ${n}`).join('\n')}`);

  const files = {
    runs: join(out, 'runs.csv'),
    summary: join(out, 'summary.csv'),
    plot: join(out, 'downtime.svg'),
    report: join(out, 'report.txt'),
  };
  const text = sections.join('\n\n') + '\n';
  writeFileSync(files.runs, runsCsv(samples));
  writeFileSync(files.summary, summaryCsv(rows));
  writeFileSync(files.plot, downtimePlot(rows, ref));
  if (restore.restored.length > 0) writeFileSync(join(out, 'restore.json'), JSON.stringify(restore.restored, null, 2));
  writeFileSync(files.report, text);
  process.stdout.write(`\n${text}\n`);
  process.stdout.write(
    `bench finished in ${formatDuration(Date.now() - started)}\n` +
      `  table and breakdown  ${files.report}\n  every run (CSV)      ${files.runs}\n` +
      `  medians (CSV)        ${files.summary}\n  plot (SVG)           ${files.plot}\n`,
  );
}

await main();
