import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostEndpoint, labDown, labUp, METRICS_PORT, type Lab, type LabHost } from '../helpers/lab.js';
import { migrate } from '../../controller/migration/index.js';
import { runWorkload } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { killOn } from '../helpers/hosts.js';
import { requireRoot } from '../helpers/root.js';

const LAB = `mt${process.pid % 100_000}`;
let lab: Lab;
let a: LabHost;
let b: LabHost;

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB, metrics: true });
  [a, b] = lab.hosts as [LabHost, LabHost];
}, 120_000);

afterAll(async () => {
  await labDown(LAB);
});

/** Scrapes an agent's /metrics as Prometheus would, and reads one sample. */
async function scrape(host: LabHost): Promise<(name: string, labels?: string) => number> {
  const response = await fetch(`http://${host.address}:${METRICS_PORT}/metrics`);
  expect(response.status).toBe(200);
  expect(response.headers.get('content-type')).toMatch(/text\/plain/);
  const text = await response.text();
  return (name, labels = '') => {
    const line = text.split('\n').find((l) => l.startsWith(`${name}${labels === '' ? ' ' : `{${labels}} `}`));
    return line === undefined ? 0 : Number(line.split(' ').at(-1));
  };
}

describe('agent metrics (Prometheus)', () => {
  it('count one committed migration on each side, its bytes, its phases and its downtime', async () => {
    const before = { a: await scrape(a), b: await scrape(b) };
    expect(before.a('ferry_migrations_total', 'role="source",outcome="committed"')).toBe(0);
    const counter = join(projectRoot(), 'dist', 'examples', 'counter');
    // Its state file is in its own directory (its working directory), which moves with it.
    await runWorkload(hostEndpoint(a), 'metered', [counter, 'state', '20', '32'], 'test');
    const report = await migrate({
      workload: 'metered',
      from: hostEndpoint(a),
      to: hostEndpoint(b),
      softwareVersion: 'test',
    });
    const after = { a: await scrape(a), b: await scrape(b) };
    expect(after.a('ferry_migrations_total', 'role="source",outcome="committed"')).toBe(1);
    expect(after.b('ferry_migrations_total', 'role="destination",outcome="resumed"')).toBe(1);
    expect(after.a('ferry_bytes_sent_total')).toBe(report.bytesSent);
    expect(after.a('ferry_pages_sent_total')).toBe(report.final.pagesWritten);
    expect(after.a('ferry_phase_duration_seconds_count', 'phase="dump"')).toBe(1);
    expect(after.a('ferry_phase_duration_seconds_count', 'phase="stream"')).toBe(1);
    expect(after.b('ferry_phase_duration_seconds_count', 'phase="restore"')).toBe(1);
    expect(after.b('ferry_downtime_seconds_count')).toBe(1);
    // The destination's own view of the downtime agrees with the report's within its resume.
    expect(after.b('ferry_downtime_seconds_sum') * 1000).toBeGreaterThan(report.downtimeMs * 0.5);
    expect(after.b('ferry_downtime_seconds_sum') * 1000).toBeLessThan(report.downtimeMs * 1.5 + 100);
    await killOn(b, report.to.pid);
  });

  it('answers nothing but GET /metrics', async () => {
    const response = await fetch(`http://${a.address}:${METRICS_PORT}/anything`);
    expect(response.status).toBe(404);
  });
});
