/**
 * npm run bench: Ferry's migration against a bare CRIU script doing the same
 * work (dump to a page server on the other host, copy the other images,
 * restore), both between the same two lab hosts, in the same run.
 *
 * Then the cost of encrypting pages: the same dump to a page server, plain
 * and with CRIU's TLS (the agents' certificates), alternating on one process.
 *
 * Options (environment): BENCH_MEMORY_MB (1024), BENCH_HOT_MB (64), BENCH_RUNS (3).
 */
import { execFile, spawn } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { labDown, labUp, type LabHost } from '../controller/lab.js';
import { migrate } from '../controller/migration.js';
import { runWorkload } from '../controller/workloads.js';
import { resolveCriuBinary } from '../src/criu/index.js';
import { projectRoot } from '../src/paths.js';
import { formatBytes } from '../src/units.js';
import { hostEndpoint } from '../controller/agents.js';

const execFileAsync = promisify(execFile);
const memoryMb = Number(process.env.BENCH_MEMORY_MB ?? 1024);
const hotMb = Number(process.env.BENCH_HOT_MB ?? 64);
const runs = Number(process.env.BENCH_RUNS ?? 3);
const LAB = 'fbench';

interface Sample {
  downtimeMs: number;
  totalMs: number;
  bytes: number;
  detail: string;
}

const criu = resolveCriuBinary().path;
const counter = join(projectRoot(), 'dist', 'examples', 'counter');

/** Runs CRIU in a lab host's agent namespaces (network and mount), as the agent's own CRIU would. */
function inHost(host: LabHost, args: string[]): string[] {
  return ['-t', String(host.pid), '-n', '-m', '--', criu, ...args];
}

async function startWorkload(a: LabHost, name: string): Promise<{ pid: number; dir: string }> {
  const dir = mkdtempSync(join(a.dataDir, `${name}-`));
  const w = await runWorkload(
    hostEndpoint(a),
    name,
    [counter, join(dir, 'state'), '20', String(memoryMb), String(hotMb)],
    'bench',
  );
  // Let it fault in its memory before measuring.
  await sleep(Math.max(1000, memoryMb * 3));
  return { pid: w.pid ?? 0, dir };
}

/** dump → page server → copy → restore with the CRIU command line and nothing else. */
async function bareCriu(a: LabHost, b: LabHost, run: number): Promise<Sample> {
  const { pid } = await startWorkload(a, `bare${run}`);
  const source = mkdtempSync(join(a.imagesDir, 'bare-'));
  const destination = mkdtempSync(join(b.imagesDir, 'bare-'));
  const port = 27_000 + run;
  const started = performance.now();
  const pageServer = spawn(
    'nsenter',
    inHost(b, ['page-server', '-D', destination, '--address', b.address, '--port', String(port)]),
    {
      stdio: 'ignore',
    },
  );
  const pageServerDone = new Promise((resolve) => pageServer.once('exit', resolve));
  await sleep(100); // the CLI page server has no readiness signal; 100 ms is counted in total time only
  const dumpStarted = performance.now();
  await execFileAsync(
    'nsenter',
    inHost(a, [
      'dump',
      '-t',
      String(pid),
      '-D',
      source,
      '--page-server',
      '--address',
      b.address,
      '--port',
      String(port),
      '-o',
      'dump.log',
    ]),
  );
  const dumped = performance.now();
  await pageServerDone;
  for (const name of readdirSync(source)) {
    if (name.endsWith('.img')) cpSync(join(source, name), join(destination, name));
  }
  const copied = performance.now();
  await execFileAsync('nsenter', inHost(b, ['restore', '-d', '-D', destination, '-o', 'restore.log']));
  const restored = performance.now();
  const bytes = pageBytes(destination);
  await killNamespaceOf(b, 'counter');
  rmSync(source, { recursive: true, force: true });
  rmSync(destination, { recursive: true, force: true });
  return {
    downtimeMs: restored - dumpStarted,
    totalMs: restored - started,
    bytes,
    detail: `dump ${ms(dumped - dumpStarted)}, copy ${ms(copied - dumped)}, restore ${ms(restored - copied)}`,
  };
}

async function ferry(a: LabHost, b: LabHost, run: number): Promise<Sample> {
  await startWorkload(a, `ferry${run}`);
  const report = await migrate({
    workload: `ferry${run}`,
    from: hostEndpoint(a),
    to: hostEndpoint(b),
    softwareVersion: 'bench',
  });
  process.kill(report.to.pid, 'SIGKILL');
  return {
    downtimeMs: report.downtimeMs,
    totalMs: report.totalMs,
    bytes: report.bytesSent,
    detail:
      `dump+stream ${ms(report.phasesMs.switchover - report.final.restoreMs)} (stream ${ms(report.final.streamMs)}), ` +
      `restore ${ms(report.final.restoreMs)}, commit+resume ${ms(report.phasesMs.commit)}; preflight ${ms(report.phasesMs.preflight)}`,
  };
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
async function pageTransfer(a: LabHost, b: LabHost, pid: number, tls: boolean, port: number): Promise<Sample> {
  const source = mkdtempSync(join(a.imagesDir, 'xfer-'));
  const destination = mkdtempSync(join(b.imagesDir, 'xfer-'));
  const pageServer = spawn(
    'nsenter',
    inHost(b, [
      'page-server',
      '-D',
      destination,
      '--address',
      b.address,
      '--port',
      String(port),
      '-o',
      'page-server.log',
      // The page server checks a client certificate against its own address (see src/criu/client.ts).
      ...(tls ? [...tlsArgs(b), '--tls-no-cn-verify'] : []),
    ]),
    { stdio: 'ignore' },
  );
  const pageServerDone = new Promise((resolve) => pageServer.once('exit', resolve));
  await sleep(100);
  const started = performance.now();
  await execFileAsync(
    'nsenter',
    inHost(a, [
      'dump',
      '-t',
      String(pid),
      '-D',
      source,
      '--leave-running',
      '--page-server',
      '--address',
      b.address,
      '--port',
      String(port),
      '-o',
      'dump.log',
      '-v4', // the handshake line is info level
      ...(tls ? tlsArgs(a) : []),
    ]),
  );
  const done = performance.now();
  await pageServerDone;
  const handshake = readFileSync(join(source, 'dump.log'), 'utf8').includes('TLS handshake completed');
  if (tls !== handshake) throw new Error(`the ${tls ? 'TLS' : 'plain'} dump ${handshake ? 'did' : 'did not'} use TLS`);
  const bytes = pageBytes(destination);
  rmSync(source, { recursive: true, force: true });
  rmSync(destination, { recursive: true, force: true });
  return { downtimeMs: done - started, totalMs: done - started, bytes, detail: '' };
}

async function tlsCost(a: LabHost, b: LabHost): Promise<void> {
  const { pid } = await startWorkload(a, 'tlscost');
  const samples: Record<'plain' | 'tls', Sample[]> = { plain: [], tls: [] };
  for (let run = 0; run < runs; run++) {
    for (const mode of ['plain', 'tls'] as const) {
      const sample = await pageTransfer(a, b, pid, mode === 'tls', 27_100 + run * 2 + (mode === 'tls' ? 1 : 0));
      samples[mode].push(sample);
      process.stderr.write(
        `  run ${run + 1} page transfer ${mode}: ${ms(sample.totalMs)} for ${formatBytes(sample.bytes)} (${rate(sample)})\n`,
      );
    }
  }
  await killNamespaceOf(a, 'counter');
  const plain = median(samples.plain.map((s) => s.bytes / s.totalMs));
  const tls = median(samples.tls.map((s) => s.bytes / s.totalMs));
  process.stdout.write(`\npage transfer of a ${memoryMb} MiB process (dump to a page server, median of ${runs})\n`);
  process.stdout.write(`  plain  ${formatBytes(plain * 1000)}/s\n`);
  process.stdout.write(`  TLS    ${formatBytes(tls * 1000)}/s  (${((1 - tls / plain) * 100).toFixed(0)} % slower)\n`);
}

function rate(sample: Sample): string {
  return `${formatBytes((sample.bytes / sample.totalMs) * 1000)}/s`;
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

function median(values: number[]): number {
  const sorted = [...values].sort((x, y) => x - y);
  return sorted[Math.floor(sorted.length / 2)] ?? NaN;
}

async function main(): Promise<void> {
  process.stderr.write(
    `bench: ${memoryMb} MiB process, ${hotMb} MiB rewritten every 20 ms, ${runs} runs each, lab hosts a → b\n`,
  );
  await labDown(LAB);
  const lab = await labUp({ name: LAB });
  const [a, b] = lab.hosts as [LabHost, LabHost];
  mkdirSync(a.imagesDir, { recursive: true });
  const results: Record<string, Sample[]> = { 'bare CRIU script': [], 'Ferry stop-and-copy': [] };
  try {
    for (let run = 0; run < runs; run++) {
      for (const [name, fn] of [
        ['bare CRIU script', bareCriu],
        ['Ferry stop-and-copy', ferry],
      ] as const) {
        const sample = await fn(a, b, run);
        results[name]?.push(sample);
        process.stderr.write(
          `  run ${run + 1} ${name}: downtime ${ms(sample.downtimeMs)}, total ${ms(sample.totalMs)} (${sample.detail})\n`,
        );
      }
    }
  } finally {
    await labDown(LAB);
  }
  const rows = Object.entries(results).map(([name, samples]) => ({
    name,
    downtime: median(samples.map((s) => s.downtimeMs)),
    total: median(samples.map((s) => s.totalMs)),
    bytes: median(samples.map((s) => s.bytes)),
  }));
  const base = rows[0]?.downtime ?? NaN;
  process.stdout.write(`\n${memoryMb} MiB, hot set ${hotMb} MiB, median of ${runs}\n`);
  process.stdout.write(
    `${'method'.padEnd(22)}${'downtime'.padStart(10)}${'total'.padStart(10)}${'pages sent'.padStart(12)}${'vs bare'.padStart(10)}\n`,
  );
  for (const r of rows) {
    process.stdout.write(
      `${r.name.padEnd(22)}${ms(r.downtime).padStart(10)}${ms(r.total).padStart(10)}${formatBytes(r.bytes).padStart(12)}${`${((r.downtime / base - 1) * 100).toFixed(0)} %`.padStart(10)}\n`,
    );
  }
  const again = await labUp({ name: LAB });
  try {
    await tlsCost(again.hosts[0] as LabHost, again.hosts[1] as LabHost);
  } finally {
    await labDown(LAB);
  }
}

await main();
