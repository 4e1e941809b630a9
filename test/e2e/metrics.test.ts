import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostEndpoint } from '../../controller/agents.js';
import { labDown, labUp, type LabHost } from '../../controller/lab.js';
import { migrate, MigrationFailedError } from '../../controller/migration.js';
import { runWorkload } from '../../controller/workloads.js';
import { projectRoot } from '../../src/paths.js';
import { requireRoot } from '../helpers/root.js';
import { sleep } from '../helpers/wait.js';

const LAB = 'metr';
const counter = join(projectRoot(), 'dist', 'examples', 'counter');
const scratch = mkdtempSync(join(tmpdir(), 'ferry-metrics-'));
let a: LabHost;
let b: LabHost;
let breaksRestore: LabHost;

beforeAll(async () => {
  requireRoot();
  // Host c's agent deletes an image before restoring, so its restores fail and migrations to it roll back.
  const lab = await labUp({
    name: LAB,
    hosts: 3,
    agentEnv: { c: { FERRY_TEST_FAULT: 'destination.before-restore=break-images' } },
  });
  [a, b, breaksRestore] = lab.hosts as [LabHost, LabHost, LabHost];
}, 60_000);

afterAll(async () => {
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** GET /metrics, as Prometheus would, parsed into samples (text format 0.0.4). */
async function scrape(host: LabHost): Promise<Sample[]> {
  const response = await fetch(host.metricsUrl);
  expect(response.status).toBe(200);
  expect(response.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  const samples: Sample[] = [];
  for (const line of (await response.text()).split('\n')) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (match === null) continue;
    const labels = Object.fromEntries(
      [...(match[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((m): [string, string] => [m[1] ?? '', m[2] ?? '']),
    );
    samples.push({ name: match[1] ?? '', labels, value: Number(match[3]) });
  }
  return samples;
}

/** The sum of the samples with this name whose labels include `labels`. */
function value(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
  return samples
    .filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0);
}

/** What changed between two scrapes, for one series. */
function moved(before: Sample[], after: Sample[], name: string, labels: Record<string, string> = {}): number {
  return value(after, name, labels) - value(before, name, labels);
}

/** Kills a counter this test started, only if the PID still runs one of them (PIDs are reused). */
function killOurs(pid: number): void {
  try {
    if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(scratch)) process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

function runsOurs(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(scratch);
  } catch {
    return false;
  }
}

async function startCounter(host: LabHost, name: string): Promise<number> {
  const dir = mkdtempSync(join(scratch, `${name}-`));
  const w = await runWorkload(hostEndpoint(host), name, [counter, join(dir, 'state'), '20', '32', '4'], 'test');
  await sleep(300);
  return w.pid ?? 0;
}

describe('agent metrics', () => {
  it('count one committed migration on each side, with the bytes and downtime of its report', async () => {
    const [sourceBefore, destinationBefore] = await Promise.all([scrape(a), scrape(b)]);
    await startCounter(a, 'metered');

    const report = await migrate({
      workload: 'metered',
      from: hostEndpoint(a),
      to: hostEndpoint(b),
      softwareVersion: 'test',
    });
    try {
      const [source, destination] = await Promise.all([scrape(a), scrape(b)]);
      const migrations = 'ferry_migrations_total';
      expect(moved(sourceBefore, source, migrations, { role: 'source', outcome: 'committed' })).toBe(1);
      expect(moved(sourceBefore, source, migrations)).toBe(1);
      expect(moved(destinationBefore, destination, migrations, { role: 'destination', outcome: 'committed' })).toBe(1);
      expect(moved(destinationBefore, destination, migrations)).toBe(1);
      expect(value(source, migrations, { agent: 'a' })).toBe(value(source, migrations));

      // What the source says it sent is what the report says was sent.
      const pages = report.rounds.reduce((sum, r) => sum + r.pagesWritten, 0) + report.final.pagesWritten;
      expect(pages).toBeGreaterThan(0);
      expect(moved(sourceBefore, source, 'ferry_sent_pages_total')).toBe(pages);
      expect(moved(sourceBefore, source, 'ferry_sent_bytes_total')).toBe(report.bytesSent);
      expect(moved(sourceBefore, source, 'ferry_sent_bytes_total', { kind: 'images' })).toBe(report.final.imageBytes);
      expect(moved(destinationBefore, destination, 'ferry_sent_bytes_total')).toBe(0);

      // One downtime, on the destination, measured on its own clock from the source's frozen time.
      expect(moved(destinationBefore, destination, 'ferry_downtime_seconds_count')).toBe(1);
      expect(moved(sourceBefore, source, 'ferry_downtime_seconds_count')).toBe(0);
      const downtimeMs = moved(destinationBefore, destination, 'ferry_downtime_seconds_sum') * 1000;
      expect(downtimeMs).toBeGreaterThan(0);
      expect(Math.abs(downtimeMs - report.downtimeMs)).toBeLessThan(Math.max(50, report.downtimeMs * 0.1));
      // Every bucket at or above the observed downtime counted it.
      const inf = { le: '+Inf' };
      expect(moved(destinationBefore, destination, 'ferry_downtime_seconds_bucket', inf)).toBe(1);

      // Each side timed its own steps, once each.
      const phase = 'ferry_phase_duration_seconds_count';
      for (const p of ['dump', 'image_stream', 'held'])
        expect(moved(sourceBefore, source, phase, { role: 'source', phase: p }), p).toBe(1);
      for (const p of ['restore', 'held', 'resume'])
        expect(moved(destinationBefore, destination, phase, { role: 'destination', phase: p }), p).toBe(1);
      const restoreMs =
        moved(destinationBefore, destination, 'ferry_phase_duration_seconds_sum', {
          role: 'destination',
          phase: 'restore',
        }) * 1000;
      expect(Math.abs(restoreMs - report.final.restoreMs)).toBeLessThanOrEqual(1);
      expect(value(source, 'ferry_criu_service_restarts_total')).toBe(0);
    } finally {
      killOurs(report.to.pid);
    }
  });

  it('count a rolled-back migration as aborted on both sides and as committed on neither', async () => {
    const [sourceBefore, destinationBefore] = await Promise.all([scrape(a), scrape(breaksRestore)]);
    const pid = await startCounter(a, 'unmoved');
    try {
      await expect(
        migrate({
          workload: 'unmoved',
          from: hostEndpoint(a),
          to: hostEndpoint(breaksRestore),
          softwareVersion: 'test',
        }),
      ).rejects.toBeInstanceOf(MigrationFailedError);
      const [source, destination] = await Promise.all([scrape(a), scrape(breaksRestore)]);
      const migrations = 'ferry_migrations_total';
      expect(moved(sourceBefore, source, migrations, { role: 'source', outcome: 'aborted' })).toBe(1);
      expect(moved(sourceBefore, source, migrations, { outcome: 'committed' })).toBe(0);
      expect(moved(destinationBefore, destination, migrations, { role: 'destination', outcome: 'aborted' })).toBe(1);
      expect(moved(destinationBefore, destination, migrations, { outcome: 'committed' })).toBe(0);
      expect(moved(destinationBefore, destination, 'ferry_downtime_seconds_count')).toBe(0);
      expect(moved(sourceBefore, source, 'ferry_phase_duration_seconds_count', { phase: 'held' })).toBe(1);
      expect(runsOurs(pid)).toBe(true);
    } finally {
      killOurs(pid);
    }
  });

  it('answer only GET /metrics', async () => {
    expect((await fetch(a.metricsUrl.replace('/metrics', '/'))).status).toBe(404);
    expect((await fetch(a.metricsUrl, { method: 'POST' })).status).toBe(404);
  });
});
