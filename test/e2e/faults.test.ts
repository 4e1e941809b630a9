import { execFile } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { labDown, labUp, restartAgent, type LabHost } from '../../controller/lab.js';
import { migrationRecords, runWorkload } from '../../controller/workloads.js';
import { projectRoot } from '../../src/paths.js';
import { requireRoot } from '../helpers/root.js';
import { sleep, waitFor } from '../helpers/wait.js';

/**
 * The fault matrix: a migration of a stateful workload, a crash at a named
 * point of the switchover, recovery, then the checks that matter: exactly
 * one copy runs, its journal of counts has no gap and no repeat (nothing
 * lost beyond the frozen moment, no rewind), and nothing is left behind.
 */
const execFileAsync = promisify(execFile);
const LAB = `ff${process.pid % 100_000}`;
const HOLD_MS = 3_000;
const stateful = join(projectRoot(), 'dist', 'examples', 'stateful');
const ferry = join(projectRoot(), 'bin', 'ferry');
const scratch = mkdtempSync(join(tmpdir(), 'ferry-faults-'));
let a: LabHost;
let b: LabHost;

type Who = 'controller' | 'source agent' | 'destination agent';
interface Cell {
  who: Who;
  point: string;
  /** crash, cut-controller (this party ↔ controller), cut-peer (source ↔ destination), fill-images, kill-criu-worker. */
  action: string;
  /** Where the one copy runs once everything is settled. */
  endsOn: 'a' | 'b';
}

const crashes: Cell[] = [
  ['controller', 'controller.after-held', 'a'],
  ['controller', 'controller.after-restored', 'a'],
  ['controller', 'controller.after-commit', 'b'],
  ['source agent', 'source.after-hold', 'a'],
  ['source agent', 'source.before-commit-answer', 'a'],
  ['source agent', 'source.after-commit', 'b'],
  ['destination agent', 'destination.during-images', 'a'],
  ['destination agent', 'destination.after-restore-held', 'a'],
  ['destination agent', 'destination.before-resume-answer', 'b'],
].map(([who, point, endsOn]) => ({ who, point, action: 'crash', endsOn }) as Cell);

const cuts: Cell[] = [
  { who: 'source agent', point: 'source.after-hold', action: 'cut-controller', endsOn: 'a' },
  { who: 'source agent', point: 'source.after-commit', action: 'cut-controller', endsOn: 'b' },
  { who: 'destination agent', point: 'destination.after-restore-held', action: 'cut-controller', endsOn: 'a' },
  { who: 'source agent', point: 'source.before-stream', action: 'cut-peer', endsOn: 'a' },
  { who: 'destination agent', point: 'destination.after-restore-held', action: 'cut-peer', endsOn: 'b' },
];

const resources: Cell[] = [
  { who: 'destination agent', point: 'destination.page-server', action: 'fill-images', endsOn: 'a' },
  { who: 'source agent', point: 'source.frozen', action: 'kill-criu-worker', endsOn: 'a' },
  { who: 'destination agent', point: 'preflight', action: 'criu-vanished', endsOn: 'a' },
];

/** The destination's CRIU binary disappears and its service dies: it cannot come back. */
async function vanishCriu(): Promise<void> {
  const wrapper = join(mkdtempSync(join(scratch, 'criu-')), 'criu');
  writeFileSync(wrapper, `#!/bin/sh\nexec ${join(projectRoot(), '.criu', 'bin', 'criu')} "$@"\n`, { mode: 0o755 });
  const agent = await restartAgent(LAB, 'b', { FERRY_CRIU: wrapper });
  rmSync(wrapper);
  const children = readFileSync(`/proc/${agent.pid}/task/${agent.pid}/children`, 'utf8').trim().split(/\s+/);
  for (const pid of children) {
    if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('service')) process.kill(Number(pid), 'SIGKILL');
  }
}

const results: string[] = [];

beforeAll(async () => {
  requireRoot();
  const lab = await labUp({ name: LAB });
  [a, b] = lab.hosts as [LabHost, LabHost];
}, 60_000);

afterAll(async () => {
  console.log(
    ['fault matrix (party: point=fault → migrate exit code, where the one copy runs):', ...results].join('\n'),
  );
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

/** Inits (PID 1 of their namespace) of the workload that writes into `dir`, and the network namespace each runs in. */
function copiesOf(dir: string): { pid: number; host: string | undefined }[] {
  const copies: { pid: number; host: string | undefined }[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      if (!cmdline[0]?.endsWith('/stateful') || cmdline[1] !== dir) continue;
      const status = readFileSync(`/proc/${entry}/status`, 'utf8');
      if (/^State:\s+Z/m.test(status) || /^NSpid:.*\s1$/m.exec(status) === null) continue;
      copies.push({ pid: Number(entry), host: hostOf(Number(entry)) });
    } catch {
      // gone meanwhile
    }
  }
  return copies;
}

function hostOf(pid: number): string | undefined {
  const inode = Number(/\[(\d+)\]/.exec(readlinkSync(`/proc/${pid}/ns/net`))?.[1]);
  return [a, b].find((h) => statSync(`/run/netns/${h.netns}`).ino === inode)?.host;
}

function journalOk(dir: string): { ok: boolean; last: number; why: string } {
  const lines = readFileSync(join(dir, 'journal'), 'utf8').trim().split('\n').map(Number);
  for (let i = 0; i < lines.length; i++) {
    if (lines[i] !== i + 1) return { ok: false, last: lines.at(-1) ?? 0, why: `line ${i + 1} is ${lines[i]}` };
  }
  return { ok: true, last: lines.at(-1) ?? 0, why: '' };
}

async function openMigrations(host: LabHost): Promise<string[]> {
  const records = await migrationRecords(host.url, 'test', false);
  return records
    .filter((r) => !['committed', 'aborted', 'resumed', 'discarded'].includes(r.state ?? ''))
    .map((r) => `${r.migrationId} ${r.state}`);
}

/** Migrates a fresh workload with `cell`'s fault armed, heals, lets the agents settle, and checks the outcome. */
async function runCell(cell: Cell, index: number): Promise<void> {
  const name = `w${index}`;
  const dir = mkdtempSync(join(scratch, `${name}-`));
  await runWorkload(a.url, name, [stateful, dir, '1'], 'test');
  await sleep(300);

  // A full disk is a small one: the destination's images go to a 48 MiB tmpfs for this cell.
  const smallDisk = cell.action === 'fill-images';
  if (smallDisk) await execFileAsync('mount', ['-t', 'tmpfs', '-o', 'size=48m', 'ferry-test', b.imagesDir]);
  const fault = { FERRY_TEST_FAULT: `${cell.point}=${cell.action}` };
  if (cell.action === 'criu-vanished') await vanishCriu();
  else if (cell.who === 'source agent') await restartAgent(LAB, 'a', fault);
  else if (cell.who === 'destination agent') await restartAgent(LAB, 'b', fault);
  const env = { ...process.env, FERRY_LAB: LAB, ...(cell.who === 'controller' ? fault : {}) };
  let stderr = '';
  const migration = await execFileAsync(
    ferry,
    ['migrate', name, '--from', 'a', '--to', 'b', '--hold', String(HOLD_MS)],
    {
      env,
      timeout: 120_000,
    },
  ).then(
    () => 0,
    (e: { code?: number; signal?: string; stderr?: string }) => {
      stderr = e.stderr ?? '';
      return e.code ?? (e.signal === 'SIGKILL' ? 137 : -1);
    },
  );
  // The fault did strike where it was meant to.
  if (cell.who === 'controller') expect(migration).toBe(137);
  else if (cell.action === 'criu-vanished') {
    expect(migration).toBe(1);
    expect(stderr).toMatch(/b: criu service exited at start/);
    expect(stderr).toMatch(/hint: the CRIU binary .* is gone/);
    expect(stderr).toMatch(/The process still runs on a, unchanged/);
  } else {
    const log = readFileSync((cell.who === 'source agent' ? a : b).logFile, 'utf8');
    expect(log).toContain(`injecting a test fault point=${cell.point} action=${cell.action}`);
  }
  // Heal: the network comes back, the disk is freed, a crashed agent restarts (without the fault).
  for (const h of [a, b]) await execFileAsync('ip', ['-n', h.netns, 'route', 'flush', 'type', 'blackhole']);
  rmSync(join(b.imagesDir, 'ballast'), { force: true });
  if (smallDisk) await execFileAsync('umount', ['-l', b.imagesDir]);
  if (cell.who === 'source agent') await restartAgent(LAB, 'a');
  if (cell.who === 'destination agent') await restartAgent(LAB, 'b');

  await waitFor(
    async () => {
      const copies = copiesOf(dir);
      return (
        copies.length === 1 &&
        copies[0]?.host === cell.endsOn &&
        (await openMigrations(a)).length === 0 &&
        (await openMigrations(b)).length === 0
      );
    },
    {
      what: `${cell.point}=${cell.action} to settle with one copy on ${cell.endsOn} (now: ${JSON.stringify(copiesOf(dir))})`,
      timeoutMs: 45_000,
      intervalMs: 250,
    },
  );
  const [copy] = copiesOf(dir);
  // It runs: the journal grows, and it is 1, 2, 3, ... without a gap or a repeat.
  const before = journalOk(dir);
  await waitFor(() => journalOk(dir).last > before.last + 5, { what: 'the surviving copy to keep counting' });
  const after = journalOk(dir);
  expect(after.ok, after.why).toBe(true);
  // Nothing left behind: no images, no other copy, no stopped process.
  expect(readdirSync(a.imagesDir).filter((n) => n.startsWith('m-'))).toEqual([]);
  expect(readdirSync(b.imagesDir).filter((n) => n.startsWith('m-'))).toEqual([]);
  expect(copiesOf(dir)).toHaveLength(1);
  results.push(
    `  ${cell.who.padEnd(18)} ${`${cell.point}=${cell.action}`.padEnd(48)} exit ${migration}, one copy on ${copy?.host}`,
  );
  if (copy !== undefined) process.kill(copy.pid, 'SIGKILL');
}

let index = 0;
for (const [title, group] of [
  ['a crash at each point of the switchover', crashes],
  ['a network cut at points of the switchover', cuts],
  ['resources failing during the switchover', resources],
] as const) {
  describe(`fault matrix: ${title}`, () => {
    for (const cell of group) {
      const i = index++;
      it(`${cell.who}: ${cell.point}=${cell.action} → one copy runs on ${cell.endsOn}, nothing lost or repeated, nothing left`, () =>
        runCell(cell, i));
    }
  });
}

describe('after the matrix', () => {
  it('ferry status shows nothing in flight, recover has nothing left to settle, and the journals say what recovery did', async () => {
    const env = { ...process.env, FERRY_LAB: LAB };
    const status = await execFileAsync(ferry, ['status', '--on', 'a', '--on', 'b'], { env });
    expect(status.stdout).toBe('a: no migration in flight\nb: no migration in flight\n');
    const recover = await execFileAsync(ferry, ['recover', '--on', 'a', '--on', 'b'], { env });
    expect(recover.stdout).toBe('a: nothing to settle\nb: nothing to settle\n');
    const all = JSON.parse(
      (await execFileAsync(ferry, ['status', '--all', '--json', '--on', 'a', '--on', 'b'], { env })).stdout,
    ) as Record<string, { state: string; action: string }[]>;
    const actions = [...(all.a ?? []), ...(all.b ?? [])].map((r) => r.action);
    expect(actions).toContain('recovered: restored from the kept images after the commit');
    expect(actions.filter((x) => x.startsWith('recovered: the process runs on the source')).length).toBeGreaterThan(0);
  });
});
