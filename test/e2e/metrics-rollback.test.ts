import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostEndpoint, labDown, labUp, METRICS_PORT, type LabHost } from '../helpers/lab.js';
import { migrate, MigrationFailedError } from '../../controller/migration/index.js';
import { runWorkload } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { requireRoot } from '../helpers/root.js';
import { sleep } from '../helpers/wait.js';

const LAB = `mb${process.pid % 100_000}`;
const scratch = mkdtempSync(join(tmpdir(), 'ferry-metrics-rollback-'));
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
  rmSync(scratch, { recursive: true, force: true });
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

/** Whether the PID runs this test's counter (PIDs are reused). */
function ours(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(scratch);
  } catch {
    return false;
  }
}

describe('agent metrics of a rolled-back migration', () => {
  it('count it on both sides, as committed on neither, with no downtime', async () => {
    const [sourceBefore, destinationBefore] = await Promise.all([scrape(a), scrape(breaksRestore)]);
    const w = await runWorkload(
      hostEndpoint(a),
      'unmoved',
      [
        join(projectRoot(), 'dist', 'examples', 'counter'),
        join(mkdtempSync(join(scratch, 'w-')), 'state'),
        '20',
        '16',
        '2',
      ],
      'test',
    );
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
      if (ours(pid)) process.kill(pid, 'SIGKILL');
    }
  });
});
