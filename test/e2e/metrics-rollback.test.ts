import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostEndpoint, labDown, labUp, METRICS_PORT, type LabHost } from '../helpers/lab.js';
import { migrate, MigrationFailedError } from '../../controller/migration/index.js';
import { runWorkload } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { killOn, pidOn } from '../helpers/hosts.js';
import { requireRoot } from '../helpers/root.js';
import { sleep } from '../helpers/wait.js';

const LAB = `mb${process.pid % 100_000}`;
let a: LabHost;
let breaksRestore: LabHost;

beforeAll(async () => {
  requireRoot();
  // Host b's agent deletes an image before restoring, so its restores fail and migrations to it roll back.
  const lab = await labUp({
    name: LAB,
    metrics: true,
    agentEnv: { b: { FERRY_TEST_FAULT: 'destination.before-restore=break-images' } },
  });
  [a, breaksRestore] = lab.hosts as [LabHost, LabHost];
}, 120_000);

afterAll(async () => {
  await labDown(LAB);
});

/** The sum of an agent's samples of a metric whose labels include all of `labels`. */
async function scrape(host: LabHost): Promise<(name: string, labels?: Record<string, string>) => number> {
  const text = await (await fetch(`http://${host.address}:${METRICS_PORT}/metrics`)).text();
  return (name, labels = {}) =>
    text
      .split('\n')
      .filter((line) => line.startsWith(`${name}{`) || line.startsWith(`${name} `))
      .filter((line) => Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`)))
      .reduce((sum, line) => sum + Number(line.split(' ').at(-1)), 0);
}

/** The counter this test runs, with its state file in its own directory (its working directory). */
const counter = [join(projectRoot(), 'dist', 'examples', 'counter'), 'state', '20', '16', '2'];

/** Whether the source's PID (a PID on host a) runs this test's counter (PIDs are reused). */
const ours = (pid: number): boolean => pid > 0 && pidOn(a, counter) === pid;

describe('agent metrics of a rolled-back migration', () => {
  it('count it on both sides, as committed on neither, with no downtime', async () => {
    const [sourceBefore, destinationBefore] = await Promise.all([scrape(a), scrape(breaksRestore)]);
    const w = await runWorkload(hostEndpoint(a), 'unmoved', counter, 'test');
    const pid = w.pid ?? 0;
    try {
      await sleep(300);
      await expect(
        migrate({
          workload: 'unmoved',
          from: hostEndpoint(a),
          to: hostEndpoint(breaksRestore),
          softwareVersion: 'test',
        }),
      ).rejects.toBeInstanceOf(MigrationFailedError);
      const [source, destination] = await Promise.all([scrape(a), scrape(breaksRestore)]);
      const moved = (after: typeof source, before: typeof source, name: string, labels?: Record<string, string>) =>
        after(name, labels) - before(name, labels);
      const migrations = 'ferry_migrations_total';
      expect(moved(source, sourceBefore, migrations, { role: 'source', outcome: 'aborted' })).toBe(1);
      expect(moved(source, sourceBefore, migrations)).toBe(1);
      expect(moved(destination, destinationBefore, migrations, { role: 'destination', outcome: 'discarded' })).toBe(1);
      expect(moved(destination, destinationBefore, migrations)).toBe(1);
      expect(moved(destination, destinationBefore, 'ferry_downtime_seconds_count')).toBe(0);
      expect(ours(pid)).toBe(true);
    } finally {
      if (ours(pid)) await killOn(a, pid);
    }
  });
});
