/**
 * npm run bench: Ferry against a bare CRIU script doing the same work (dump
 * to a page server on the other host, copy the other images, restore), for
 * a matrix of workloads, in the same run, between the same two lab hosts;
 * then Ferry pre-copy against stop-and-copy in the kernel lab (this
 * machine's kernel does not track dirty memory); then the cost of CRIU's TLS
 * on page transfer, and Ferry's page rate plain against encrypted
 * (scripts/bench-pages.ts). Prints a table of medians, writes the samples as CSV and
 * a plot of downtime against memory size as SVG.
 *
 * Environment: BENCH_SIZES (MiB, "8,64,256,1024"; sizes the machine cannot
 * hold are skipped, and said so), BENCH_HOT (percent, "1,10,50"),
 * BENCH_RATES ("low,high"), BENCH_RUNS (3), BENCH_KERNEL_LAB (1; 0 skips the
 * pre-copy part), BENCH_KL_SIZES ("64,256"), BENCH_KL_RUNS (1),
 * BENCH_POSTCOPY (1; 0 skips the post-copy rows, which also need a machine
 * where post-copy works: docs/postcopy.md), BENCH_SERVICE (1; 0 skips the
 * service rows, scripts/bench-service.ts, which take their own
 * BENCH_SERVICE_SIZES and BENCH_SERVICE_RUNS), BENCH_OUT (bench-results).
 */
import { execFile, spawn } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { enterHost, hostEndpoint, killInHost, labDown, labUp, onHost, type LabHost } from '../controller/lab/index.js';
import { migrate } from '../controller/migration/index.js';
import { LAZY_PIPE_BYTES, lazyPipeLimits, resolveCriuBinary } from '../src/criu/index.js';
import { projectRoot } from '../src/paths.js';
import { meminfoBytes } from '../src/proc.js';
import { formatBytes } from '../src/units.js';
import { describePageRates, pageRates, type PageRates } from './bench-pages.js';
import { serviceBench } from './bench-service.js';
import {
  cells,
  csv,
  median,
  sampleOf,
  startWorkload,
  summarize,
  svg,
  table,
  worstPrediction,
  type Cell,
  type Sample,
} from './bench-matrix.js';

const execFileAsync = promisify(execFile);
const runs = Number(process.env.BENCH_RUNS ?? 3);
const LAB = 'fbench';
const BARE = 'bare CRIU script (TLS)';
const BARE_PLAIN = 'bare CRIU script (plain)';
/** What CRIU alone needs: a dump to local tmpfs images and a restore from them, same host, no network. */
const FLOOR = 'CRIU local dump + restore';
/** Time for a workload to fault its memory in before it is measured. */
const FAULT_IN = { minMs: 1000, msPerMib: 3 };
const FERRY = 'Ferry stop-and-copy';
const POSTCOPY = 'Ferry post-copy';
/** The process whose stop-and-copy measures Ferry's page rate, plain against TLS. */
const PAGE_RATE_MB = 1024;

const criu = resolveCriuBinary().path;

/** Runs CRIU in a lab host (all its namespaces), as the agent's own CRIU would. */
function inHost(host: LabHost, args: string[]): string[] {
  return [...enterHost(host.init), criu, ...args];
}

/** A fresh directory under a host's images directory: its path in the host, and as this machine reaches it. */
function hostScratch(host: LabHost, prefix: string): { dir: string; here: string } {
  const here = mkdtempSync(join(onHost(host, host.imagesDir), prefix));
  return { here, dir: join(host.imagesDir, basename(here)) };
}

/**
 * dump → page server → copy → restore with the CRIU command line and nothing
 * else, with CRIU's TLS on the page transfer as Ferry has it: the like-for-like
 * baseline of Ferry's stop-and-copy.
 */
function bareCriu(tls: boolean) {
  return (a: LabHost, b: LabHost, cell: Cell, run: number, serial: number): Promise<Sample> =>
    bareCriuRun(a, b, cell, run, serial, tls);
}

async function bareCriuRun(
  a: LabHost,
  b: LabHost,
  cell: Cell,
  run: number,
  serial: number,
  tls: boolean,
): Promise<Sample> {
  const name = `bare${serial}`;
  const { pid, dir: home } = await startWorkload(a, name, cell, FAULT_IN);
  const source = hostScratch(a, 'bare-');
  const destination = hostScratch(b, 'bare-');
  const dump = await dumpToPageServer(
    a,
    b,
    pid,
    { source: source.dir, destination: destination.dir },
    {
      port: 27_000 + (serial % 1000),
      tls,
      leaveRunning: false,
    },
  );
  const dumpStarted = dump.started;
  const dumped = dump.ended;
  // The images, and the files the process holds open (its directory and its log), as a script would copy them.
  for (const image of readdirSync(source.here)) {
    if (image.endsWith('.img')) cpSync(join(source.here, image), join(destination.here, image));
  }
  cpSync(onHost(a, home), onHost(b, home), { recursive: true, preserveTimestamps: true });
  cpSync(onHost(a, `${home}.log`), onHost(b, `${home}.log`), { preserveTimestamps: true });
  const copied = performance.now();
  await execFileAsync('nsenter', inHost(b, ['restore', '-d', '-D', destination.dir, '-o', 'restore.log']));
  const restored = performance.now();
  const bytes = pageBytes(destination.here);
  await killNamespaceOf(b, 'counter');
  rmSync(source.here, { recursive: true, force: true });
  rmSync(destination.here, { recursive: true, force: true });
  return {
    method: tls ? BARE : BARE_PLAIN,
    memoryMb: cell.memoryMb,
    hotPercent: cell.hotPercent,
    rate: cell.rate,
    run,
    downtimeMs: restored - dumpStarted,
    totalMs: restored - dumpStarted,
    bytes,
    rounds: 0,
    parts: {
      dump: Math.round(dumped - dumpStarted),
      copy: Math.round(copied - dumped),
      restore: Math.round(restored - copied),
    },
  };
}

/**
 * The floor: CRIU's own dump of the same process into local images (tmpfs,
 * no page server, no network) and its restore from them on the same host,
 * once the dump's process is gone. No migration tool can go below it.
 */
async function localCriu(a: LabHost, _b: LabHost, cell: Cell, run: number, serial: number): Promise<Sample> {
  const { pid } = await startWorkload(a, `floor${serial}`, cell, FAULT_IN);
  const { dir, here } = hostScratch(a, 'floor-');
  const started = performance.now();
  await execFileAsync('nsenter', inHost(a, ['dump', '-t', String(pid), '-D', dir, '-o', 'dump.log']));
  const dumped = performance.now();
  await execFileAsync('nsenter', inHost(a, ['restore', '-d', '-D', dir, '-o', 'restore.log']));
  const restored = performance.now();
  const bytes = pageBytes(here);
  await killNamespaceOf(a, 'counter');
  rmSync(here, { recursive: true, force: true });
  return {
    method: FLOOR,
    memoryMb: cell.memoryMb,
    hotPercent: cell.hotPercent,
    rate: cell.rate,
    run,
    downtimeMs: restored - started,
    totalMs: restored - started,
    bytes,
    rounds: 0,
    parts: { dump: Math.round(dumped - started), restore: Math.round(restored - dumped) },
  };
}

/** Ferry's own migration of a fresh workload, with the strategy given (the default: what preflight picks). */
function ferryWith(method: string, strategy?: 'postcopy') {
  return async (a: LabHost, b: LabHost, cell: Cell, run: number, serial: number): Promise<Sample> => {
    const name = `${strategy === 'postcopy' ? 'lazy' : 'ferry'}${serial}`;
    await startWorkload(a, name, cell, FAULT_IN);
    const report = await migrate({
      workload: name,
      from: hostEndpoint(a),
      to: hostEndpoint(b),
      strategy,
      softwareVersion: 'bench',
    });
    await killInHost(b, report.to.pid);
    return sampleOf(cell, method, run, report);
  };
}

/**
 * A CLI page server on b and a CLI dump on a that sends it the pages: the
 * bare CRIU path. Resolves when both have finished, with when the dump
 * started and ended (performance.now()).
 */
async function dumpToPageServer(
  a: LabHost,
  b: LabHost,
  pid: number,
  dirs: { source: string; destination: string },
  options: { port: number; tls: boolean; leaveRunning: boolean },
): Promise<{ started: number; ended: number }> {
  const pageServer = spawn(
    'nsenter',
    inHost(b, [
      'page-server',
      '-D',
      dirs.destination,
      '--address',
      b.address,
      '--port',
      String(options.port),
      '-o',
      'page-server.log',
      // The page server checks a client certificate against its own address (see src/criu/client.ts).
      ...(options.tls ? [...tlsArgs(b), '--tls-no-cn-verify'] : []),
    ]),
    { stdio: 'ignore' },
  );
  const pageServerDone = new Promise((resolve) => pageServer.once('exit', resolve));
  await sleep(100); // the CLI page server has no readiness signal; outside the measured time
  const started = performance.now();
  await execFileAsync(
    'nsenter',
    inHost(a, [
      'dump',
      '-t',
      String(pid),
      '-D',
      dirs.source,
      ...(options.leaveRunning ? ['--leave-running'] : []),
      '--page-server',
      '--address',
      b.address,
      '--port',
      String(options.port),
      '-o',
      'dump.log',
      '-v4', // the TLS handshake line is info level
      ...(options.tls ? tlsArgs(a) : []),
    ]),
  );
  const ended = performance.now();
  await pageServerDone;
  return { started, ended };
}

/** CRIU's TLS options for a lab host's identity. */
function tlsArgs(host: LabHost): string[] {
  const dir = host.tlsDir ?? '';
  return [
    '--tls',
    '--tls-cacert',
    join(dir, 'ca.pem'),
    '--tls-cert',
    join(dir, 'cert.pem'),
    '--tls-key',
    join(dir, 'key.pem'),
  ];
}

/** One dump of a running process to a page server on b, leaving it running: page transfer only. */
interface Transfer {
  ms: number;
  bytes: number;
}

async function pageTransfer(a: LabHost, b: LabHost, pid: number, tls: boolean, port: number): Promise<Transfer> {
  const source = hostScratch(a, 'xfer-');
  const destination = hostScratch(b, 'xfer-');
  const dump = await dumpToPageServer(
    a,
    b,
    pid,
    { source: source.dir, destination: destination.dir },
    { port, tls, leaveRunning: true },
  );
  const ms = dump.ended - dump.started;
  const handshake = readFileSync(join(source.here, 'dump.log'), 'utf8').includes('TLS handshake completed');
  if (tls !== handshake) throw new Error(`the ${tls ? 'TLS' : 'plain'} dump ${handshake ? 'did' : 'did not'} use TLS`);
  const bytes = pageBytes(destination.here);
  rmSync(source.here, { recursive: true, force: true });
  rmSync(destination.here, { recursive: true, force: true });
  return { ms, bytes };
}

/** The same dump to a page server, plain and over CRIU's TLS, alternating on one 1 GiB process. */
async function tlsCost(a: LabHost, b: LabHost): Promise<void> {
  const memoryMb = 1024;
  const { pid } = await startWorkload(
    a,
    'tlscost',
    { memoryMb, hotPercent: 1, hotMb: 10, rate: 'low', tickMs: 200 },
    FAULT_IN,
  );
  const samples: Record<'plain' | 'tls', Transfer[]> = { plain: [], tls: [] };
  for (let run = 0; run < runs; run++) {
    for (const mode of ['plain', 'tls'] as const) {
      const sample = await pageTransfer(a, b, pid, mode === 'tls', 27_100 + run * 2 + (mode === 'tls' ? 1 : 0));
      samples[mode].push(sample);
      process.stderr.write(
        `  run ${run + 1} page transfer ${mode}: ${ms(sample.ms)} for ${formatBytes(sample.bytes)} (${rate(sample)})\n`,
      );
    }
  }
  await killNamespaceOf(a, 'counter');
  const plain = median(samples.plain.map((s) => s.bytes / s.ms));
  const tls = median(samples.tls.map((s) => s.bytes / s.ms));
  process.stdout.write(`\npage transfer of a ${memoryMb} MiB process (dump to a page server, median of ${runs})\n`);
  process.stdout.write(`  plain  ${formatBytes(plain * 1000)}/s\n`);
  process.stdout.write(`  TLS    ${formatBytes(tls * 1000)}/s  (${((1 - tls / plain) * 100).toFixed(0)} % slower)\n`);
}

function rate(sample: Transfer): string {
  return `${formatBytes((sample.bytes / sample.ms) * 1000)}/s`;
}

function pageBytes(dir: string): number {
  let total = 0;
  for (const name of readdirSync(dir)) if (/^pages-\d+\.img$/.test(name)) total += statSync(join(dir, name)).size;
  return total;
}

async function killNamespaceOf(host: LabHost, exeSuffix: string): Promise<void> {
  const { stdout } = await execFileAsync('ip', ['netns', 'pids', host.netns]);
  for (const pid of stdout.split(/\s+/).filter(Boolean)) {
    try {
      if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0]?.endsWith(exeSuffix))
        process.kill(Number(pid), 'SIGKILL');
    } catch {
      // gone
    }
  }
}

function ms(n: number): string {
  return `${Math.round(n)} ms`;
}

/** Sizes this machine can hold: the process, its page images on tmpfs and the restored copy, with room to spare. */
function feasible(sizes: readonly number[]): number[] {
  const available = meminfoBytes('MemAvailable') / 1024 ** 2;
  return sizes.filter((size) => {
    const ok = size * 3.5 < available;
    if (!ok)
      process.stderr.write(
        `bench: skipping ${size} MiB: ${Math.round(available)} MiB available, it needs about ${Math.round(size * 3.5)}\n`,
      );
    return ok;
  });
}

/** Pre-copy needs a kernel that tracks dirty memory: it runs in the kernel lab, and comes back as samples. */
async function kernelLab(): Promise<Sample[]> {
  process.stderr.write(
    'bench: pre-copy and stop-and-copy in the kernel lab (software-emulated: slower than this machine)\n',
  );
  const child = spawn(
    'bash',
    [join(projectRoot(), 'scripts', 'kernel-lab'), '--timeout', '3600', '--', 'node', 'dist/scripts/bench-precopy.js'],
    {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: process.env,
    },
  );
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  const samples = out
    .split('\n')
    .filter((l) => l.startsWith('BENCH-SAMPLE '))
    .map((l) => JSON.parse(l.slice('BENCH-SAMPLE '.length)) as Sample);
  if (code !== 0) process.stderr.write(`bench: the kernel lab exited with ${code}; ${samples.length} samples kept\n`);
  for (const s of samples) {
    process.stderr.write(
      `  ${s.method} ${s.memoryMb} MiB hot ${s.hotPercent} % ${s.rate}: downtime ${ms(s.downtimeMs)}, ${s.rounds} rounds\n`,
    );
  }
  return samples;
}

async function main(): Promise<void> {
  const sizes = feasible((process.env.BENCH_SIZES ?? '8,64,256,1024').split(',').map(Number));
  const matrix = cells(sizes);
  process.stderr.write(
    `bench: ${matrix.length} workloads (memory ${sizes.join('/')} MiB, hot ${[...new Set(matrix.map((c) => c.hotPercent))].join('/')} %, ` +
      `dirty rate ${[...new Set(matrix.map((c) => c.rate))].join('/')}), ${runs} runs each of ${BARE} and ${FERRY}, lab hosts a → b\n`,
  );
  type Method = (a: LabHost, b: LabHost, cell: Cell, run: number, serial: number) => Promise<Sample>;
  const methods: { name: string; run: Method }[] = [
    { name: FLOOR, run: localCriu },
    { name: BARE_PLAIN, run: bareCriu(false) },
    { name: BARE, run: bareCriu(true) },
    { name: FERRY, run: ferryWith(FERRY) },
  ];
  const lazy = lazyPipeLimits();
  if (process.env.BENCH_POSTCOPY === '0') process.stderr.write('bench: post-copy rows skipped (BENCH_POSTCOPY=0)\n');
  else if (!lazy.ok) {
    process.stderr.write(
      `bench: post-copy rows skipped: fs.pipe-max-size is ${lazy.pipeMaxSize}, CRIU's lazy page server needs ${LAZY_PIPE_BYTES} ` +
        `(as root: sysctl -w fs.pipe-max-size=${LAZY_PIPE_BYTES}; docs/postcopy.md)\n`,
    );
  } else methods.push({ name: POSTCOPY, run: ferryWith(POSTCOPY, 'postcopy') });
  await labDown(LAB);
  const lab = await labUp({ name: LAB });
  const [a, b] = lab.hosts as [LabHost, LabHost];
  const samples: Sample[] = [];
  const failures: string[] = [];
  let pages: PageRates | undefined;
  let serial = 0;
  try {
    for (const cell of matrix) {
      for (let run = 0; run < runs; run++) {
        for (const method of methods) {
          let sample: Sample;
          try {
            sample = await method.run(a, b, cell, run, serial++);
          } catch (error) {
            // One failed run is reported and left out; it does not cost the others.
            failures.push(
              `${cell.memoryMb} MiB hot ${cell.hotPercent} % ${cell.rate} run ${run + 1} ${method.name}: ${(error as Error).message.split('\n')[0]}`,
            );
            process.stderr.write(`  ${failures.at(-1)}\n`);
            await killNamespaceOf(a, 'counter');
            await killNamespaceOf(b, 'counter');
            continue;
          }
          samples.push(sample);
          const parts = Object.entries(sample.parts)
            .map(([k, v]) => `${k} ${ms(v)}`)
            .join(', ');
          process.stderr.write(
            `  ${cell.memoryMb} MiB hot ${cell.hotPercent} % ${cell.rate} run ${run + 1} ${sample.method}: downtime ${ms(sample.downtimeMs)} (${parts})\n`,
          );
        }
      }
    }
    // The cost of TLS on the same two hosts, before the kernel lab takes the machine: CRIU's own, then Ferry's.
    await tlsCost(a, b);
    if (feasible([PAGE_RATE_MB]).length > 0)
      pages = await pageRates(a, b, PAGE_RATE_MB, runs, (line) => process.stderr.write(`${line}\n`));
  } finally {
    await labDown(LAB);
  }
  const service = process.env.BENCH_SERVICE === '0' ? undefined : await serviceBench();
  if (process.env.BENCH_KERNEL_LAB !== '0') samples.push(...(await kernelLab()));

  if (failures.length > 0)
    process.stdout.write(`\n${failures.length} run(s) failed and are left out:\n  ${failures.join('\n  ')}\n`);
  const rows = summarize(samples);
  process.stdout.write(
    `\nmedians of ${runs} runs on this machine (kernel lab: ${process.env.BENCH_KL_RUNS ?? 1}); downtime = frozen until running\n`,
  );
  process.stdout.write(table(rows, BARE, FERRY) + '\n');
  const worst = worstPrediction(rows);
  if (worst !== undefined) process.stdout.write(`${worst}\n`);

  // Where Ferry's stop-and-copy downtime goes, next to the bare script's, per memory size (medians over cells).
  process.stdout.write(
    '\noverhead of Ferry stop-and-copy against the bare script (medians over the hot sets and rates of each size)\n',
  );
  for (const size of sizes) {
    const f = rows.filter((r) => r.method === FERRY && r.memoryMb === size);
    const bare = rows.filter((r) => r.method === BARE && r.memoryMb === size);
    const part = (rs: typeof rows, name: string): number => median(rs.map((r) => r.parts[name] ?? 0));
    const fd = median(f.map((r) => r.downtimeMs));
    const bd = median(bare.map((r) => r.downtimeMs));
    process.stdout.write(
      `  ${size} MiB: Ferry ${ms(fd)} = dump+stream ${ms(part(f, 'dump+stream'))} (of which streaming ${ms(part(f, 'stream'))}) + ` +
        `restore ${ms(part(f, 'restore'))} + commit+resume ${ms(part(f, 'commit+resume'))} + round trips ${ms(part(f, 'round trips'))}; ` +
        `bare ${ms(bd)} = dump ${ms(part(bare, 'dump'))} + copy ${ms(part(bare, 'copy'))} + restore ${ms(part(bare, 'restore'))}; ` +
        `Ferry ${((fd / bd - 1) * 100).toFixed(0)} % ${fd >= bd ? 'over' : 'under'}\n`,
    );
    const floor = median(rows.filter((r) => r.method === FLOOR && r.memoryMb === size).map((r) => r.downtimeMs));
    const plain = median(rows.filter((r) => r.method === BARE_PLAIN && r.memoryMb === size).map((r) => r.downtimeMs));
    process.stdout.write(
      `    against the floor (${FLOOR}, ${ms(floor)}): Ferry ${(fd / floor).toFixed(2)}×; ` +
        `against the plain bare script (${ms(plain)}): Ferry ${(fd / plain).toFixed(2)}×, the TLS bare script ${(bd / plain).toFixed(2)}×\n`,
    );
  }

  if (pages !== undefined) process.stdout.write(`\n${describePageRates(pages)}\n`);
  if (service !== undefined) process.stdout.write(`\n${service}\n`);

  const out = resolve(process.env.BENCH_OUT ?? join(projectRoot(), 'bench-results'));
  mkdirSync(out, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  writeFileSync(join(out, `bench-${stamp}.csv`), csv(samples));
  writeFileSync(join(out, `bench-${stamp}.svg`), svg(rows));
  process.stdout.write(`\nsamples: ${join(out, `bench-${stamp}.csv`)}\nplot:    ${join(out, `bench-${stamp}.svg`)}\n`);
}

await main();
