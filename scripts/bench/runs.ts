/**
 * One run of each strategy between two lab hosts a → b, on a fresh workload:
 * the bare CRIU script (plain or with CRIU's TLS) and Ferry.
 */
import { execFile, spawn } from 'node:child_process';
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { hostEndpoint } from '../../controller/agents.js';
import type { LabHost } from '../../controller/lab.js';
import { migrate, type MigrationReport, type Strategy } from '../../controller/migration.js';
import { runWorkload } from '../../controller/workloads.js';
import { readDumpStats, resolveCriuBinary } from '../../src/criu/index.js';
import { projectRoot } from '../../src/paths.js';
import { PAGE_SIZE } from '../../src/units.js';
import { TICK_MS, type Sample, type StrategyName, type Where, type Workload } from './matrix.js';

const execFileAsync = promisify(execFile);
const counter = join(projectRoot(), 'dist', 'examples', 'counter');
/** Where the bench's workloads keep their state files: every process of the bench names it in its command line. */
const scratch = mkdtempSync('/tmp/ferry-bench-');

/** Runs CRIU in a lab host's agent namespaces (network and mount), as the agent's own CRIU would. */
function inHost(host: LabHost, args: string[]): string[] {
  return ['-t', String(host.pid), '-n', '-m', '--', resolveCriuBinary().path, ...args];
}

export interface Started {
  pid: number;
  name: string;
  stateFile: string;
}

let serial = 0;

/** The counter workload on host a, started by its agent (own PID namespace), once its memory is filled. */
export async function startWorkload(a: LabHost, w: Workload): Promise<Started> {
  const name = `bench${++serial}`;
  const stateFile = join(mkdtempSync(join(scratch, `${name}-`)), 'state');
  const memoryMb = Math.round(w.memoryBytes / 2 ** 20);
  const hotMb = Math.max(1, Math.round((memoryMb * w.hotPercent) / 100));
  const started = await runWorkload(
    hostEndpoint(a),
    name,
    [counter, stateFile, String(TICK_MS[w.rate]), String(memoryMb), String(hotMb)],
    'bench',
  );
  // The counter fills all of its memory before its first count.
  const deadline = Date.now() + 600_000;
  while (count(stateFile) < 2) {
    if (Date.now() > deadline) throw new Error(`workload ${name} did not start counting within 10 min`);
    await sleep(50);
  }
  return { pid: started.pid ?? 0, name, stateFile };
}

function count(stateFile: string): number {
  try {
    return Number(readFileSync(stateFile, 'utf8').trim().split(/\s+/)[1] ?? 0);
  } catch {
    return 0;
  }
}

/** Kills the bench's counters in a host, checking that each PID is one (by its command line). */
export async function killWorkloads(host: LabHost): Promise<void> {
  const { stdout } = await execFileAsync('ip', ['netns', 'pids', host.netns]);
  for (const pid of stdout.split(/\s+/).filter(Boolean)) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (argv[0] === counter && argv[1]?.startsWith(scratch)) process.kill(Number(pid), 'SIGKILL');
    } catch {
      // gone
    }
  }
}

export function removeScratch(): void {
  rmSync(scratch, { recursive: true, force: true });
}

/** CRIU's TLS options for a lab host's identity. */
function tlsArgs(host: LabHost): string[] {
  const dir = host.tlsDir;
  if (dir === undefined) throw new Error('the lab runs without TLS: no certificates for CRIU');
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

/** A CLI page server on b; resolves once it listens (its --status-fd), with its exit to wait for. */
async function pageServer(b: LabHost, dir: string, port: number, tls: boolean): Promise<{ exited: Promise<void> }> {
  const child = spawn(
    'nsenter',
    inHost(b, [
      'page-server',
      '-D',
      dir,
      '--address',
      b.address,
      '--port',
      String(port),
      '-o',
      'page-server.log',
      '--status-fd',
      '3',
      // The CLI page server checks a client certificate's name against its own address (docs/security.md).
      ...(tls ? [...tlsArgs(b), '--tls-no-cn-verify'] : []),
    ]),
    { stdio: ['ignore', 'ignore', 'ignore', 'pipe'] },
  );
  const exited = new Promise<void>((resolve, reject) =>
    child.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`criu page-server exited with ${code}`)))),
  );
  exited.catch(() => undefined);
  const status = child.stdio[3];
  if (status === null || status === undefined) throw new Error('no status pipe');
  await new Promise<void>((resolve, reject) => {
    status.once('data', () => resolve());
    status.once('end', () => resolve());
    child.once('error', reject);
  });
  return { exited };
}

let port = 27_000;

/**
 * The baseline: what a person would script with the CRIU command line and
 * nothing else. A page server on b, a dump on a that sends the pages to it
 * (and ends the process), the other images copied to b, a restore there.
 */
export async function bareRun(a: LabHost, b: LabHost, w: Workload, run: number, tls: boolean): Promise<Sample> {
  const { pid } = await startWorkload(a, w);
  const source = mkdtempSync(join(a.imagesDir, 'bare-'));
  const destination = mkdtempSync(join(b.imagesDir, 'bare-'));
  try {
    port = port >= 27_900 ? 27_000 : port + 1;
    const started = performance.now();
    const server = await pageServer(b, destination, port, tls);
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
        ...(tls ? tlsArgs(a) : []),
      ]),
    );
    const dumped = performance.now();
    await server.exited;
    let copied = 0;
    for (const name of readdirSync(source)) {
      if (!name.endsWith('.img')) continue;
      cpSync(join(source, name), join(destination, name));
      copied += statSync(join(destination, name)).size;
    }
    const copyDone = performance.now();
    await execFileAsync('nsenter', inHost(b, ['restore', '-d', '-D', destination, '-o', 'restore.log']));
    const restored = performance.now();
    const stats = await readDumpStats(source);
    // The process is frozen from when CRIU starts freezing it until the dump ends; before that CRIU starts up.
    const frozenMs = (stats.freezingTimeUs + stats.frozenTimeUs) / 1000;
    const startupMs = Math.max(0, dumped - dumpStarted - frozenMs);
    return {
      ...w,
      strategy: tls ? 'bare-tls' : 'bare',
      where: 'lab',
      run,
      downtimeMs: frozenMs + (restored - dumped),
      totalMs: restored - started,
      bytesSent: stats.pagesWritten * PAGE_SIZE + copied,
      rounds: 1,
      parts: {
        dump: frozenMs,
        copy: copyDone - dumped,
        restore: restored - copyDone,
        startup: startupMs,
      },
    };
  } finally {
    await killWorkloads(b);
    await killWorkloads(a);
    rmSync(source, { recursive: true, force: true });
    rmSync(destination, { recursive: true, force: true });
  }
}

interface MetricSample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** An agent's metrics, as Prometheus scrapes them. */
async function scrape(host: LabHost): Promise<MetricSample[]> {
  const text = await (await fetch(host.metricsUrl)).text();
  const samples: MetricSample[] = [];
  for (const line of text.split('\n')) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (match === null) continue;
    const labels = Object.fromEntries(
      [...(match[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((m): [string, string] => [m[1] ?? '', m[2] ?? '']),
    );
    samples.push({ name: match[1] ?? '', labels, value: Number(match[3]) });
  }
  return samples;
}

/** Milliseconds an agent spent in a phase between two scrapes. */
function phaseMs(before: MetricSample[], after: MetricSample[], role: string, phase: string): number {
  const sum = (samples: MetricSample[]): number =>
    samples
      .filter(
        (s) => s.name === 'ferry_phase_duration_seconds_sum' && s.labels.role === role && s.labels.phase === phase,
      )
      .reduce((total, s) => total + s.value, 0);
  return (sum(after) - sum(before)) * 1000;
}

/** One Ferry migration a → b, with where its downtime went from both agents' metrics. */
export async function ferryRun(
  a: LabHost,
  b: LabHost,
  w: Workload,
  run: number,
  strategy: Extract<Strategy, StrategyName>,
  where: Where,
): Promise<Sample> {
  const { name } = await startWorkload(a, w);
  try {
    const [sourceBefore, destinationBefore] = await Promise.all([scrape(a), scrape(b)]);
    const report: MigrationReport = await migrate({
      workload: name,
      from: hostEndpoint(a),
      to: hostEndpoint(b),
      strategy,
      softwareVersion: 'bench',
    });
    const [source, destination] = await Promise.all([scrape(a), scrape(b)]);
    const parts = {
      dump: phaseMs(sourceBefore, source, 'source', 'dump'),
      stream: phaseMs(sourceBefore, source, 'source', 'image_stream'),
      restore: phaseMs(destinationBefore, destination, 'destination', 'restore'),
      resume: phaseMs(destinationBefore, destination, 'destination', 'resume'),
      commit: 0,
      protocol: 0,
    };
    // The report's commit phase runs from the destination's "restored" to its "resumed": the source's commit plus the resume.
    parts.commit = Math.max(0, report.phasesMs.commit - parts.resume);
    parts.protocol = report.downtimeMs - parts.dump - parts.stream - parts.restore - parts.commit - parts.resume;
    return {
      ...w,
      strategy,
      where,
      run,
      downtimeMs: report.downtimeMs,
      totalMs: report.totalMs,
      bytesSent: report.bytesSent,
      rounds: report.rounds.length + 1,
      parts: { ...parts, preflight: report.phasesMs.preflight, precopy: report.phasesMs.precopy },
    };
  } finally {
    await killWorkloads(b);
    await killWorkloads(a);
  }
}
