import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FERRY_BIN } from '../helpers/cli.js';
import { hostEndpoint, labDown, labUp, restartAgent, type LabHost } from '../helpers/lab.js';
import { migrationRecords, runWorkload } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { inNetns } from '../../src/proc.js';
import { homeFile, homeIn, hostPauseEnv, inHost, onHost, pauseDirOn } from '../helpers/hosts.js';
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
const ferry = FERRY_BIN;
let a: LabHost;
let b: LabHost;

type Who = 'controller' | 'source agent' | 'destination agent';

/** Where a migration can be caught: each party's steps around the switchover, in order. */
const POINTS = [
  'controller.after-preflight',
  'destination.during-images',
  'source.after-hold',
  'controller.after-held',
  'destination.after-restore-held',
  'controller.after-restored',
  'source.before-commit-answer',
  'source.after-commit',
  'controller.after-commit',
  'destination.before-resume-answer',
] as const;

/** What can happen to the parties while one of them is paused at a point. */
const KINDS = [
  'kill controller',
  'kill source agent',
  'kill destination agent',
  'cut source↔destination',
  'cut controller↔agents',
] as const;
type Kind = (typeof KINDS)[number];

/** Faults that only one party can inflict on itself (FERRY_TEST_FAULT, agent/faults.ts). */
interface Cell {
  who: Who;
  point: string;
  action: string;
  endsOn: 'a' | 'b';
}

const resources: Cell[] = [
  { who: 'destination agent', point: 'destination.page-server', action: 'fill-images', endsOn: 'a' },
  { who: 'source agent', point: 'source.frozen', action: 'kill-criu-worker', endsOn: 'a' },
  { who: 'destination agent', point: 'preflight', action: 'criu-vanished', endsOn: 'a' },
];

/** The destination's CRIU binary disappears and its service dies: it cannot come back. */
async function vanishCriu(): Promise<void> {
  // The wrapper is a file on b, where b's agent looks for it.
  const wrapper = join('/tmp', basename(mkdtempSync(onHost(b, '/tmp/criu-'))), 'criu');
  writeFileSync(onHost(b, wrapper), `#!/bin/sh\nexec ${join(projectRoot(), '.criu', 'bin', 'criu')} "$@"\n`, {
    mode: 0o755,
  });
  const agent = (b = await restartAgent(LAB, 'b', { ...hostPauseEnv, FERRY_CRIU: wrapper }));
  rmSync(onHost(b, wrapper));
  // The agent's children as this machine sees them (its own /proc): machine PIDs.
  const children = readFileSync(`/proc/${agent.pid}/task/${agent.pid}/children`, 'utf8').trim().split(/\s+/);
  for (const pid of children) {
    if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('service')) process.kill(Number(pid), 'SIGKILL');
  }
}

const results: string[] = [];

/** The controller's pause directory (it runs on this machine); each agent has its own in its host. */
const pauseDir = mkdtempSync(join(tmpdir(), 'ferry-pause-'));
const pauseEnv = { FERRY_TEST_PAUSE_DIR: pauseDir };

/** The pause directory of the party that reaches `point`, as this machine reaches it. */
function pauseDirOf(point: string): string {
  if (point.startsWith('source.')) return pauseDirOn(a);
  if (point.startsWith('destination.')) return pauseDirOn(b);
  return pauseDir;
}

beforeAll(async () => {
  requireRoot();
  const lab = await labUp({ name: LAB, agentEnv: { a: hostPauseEnv, b: hostPauseEnv } });
  [a, b] = lab.hosts as [LabHost, LabHost];
}, 60_000);

afterAll(async () => {
  console.log(
    ['fault matrix (party: point=fault → migrate exit code, where the one copy runs):', ...results].join('\n'),
  );
  await labDown(LAB);
  rmSync(pauseDir, { recursive: true, force: true });
});

/**
 * Inits (PID 1 of their namespace) of the workload `name` wherever they run, as this machine
 * sees them (its own /proc shows every host's processes, by machine PIDs), and the host each
 * runs on. A copy works in its own directory (the same path on every host), '.' to it.
 */
function copiesOf(name: string): { pid: number; host: string | undefined }[] {
  const copies: { pid: number; host: string | undefined }[] = [];
  const home = homeIn(a, name);
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      if (!cmdline[0]?.endsWith('/stateful') || cmdline[1] !== '.') continue;
      if (readlinkSync(`/proc/${entry}/cwd`) !== home) continue;
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
  return [a, b].find((h) => inNetns(pid, h.netns))?.host;
}

/** The journal of workload `name` in its own directory on the host it runs on: that host's copy of the file. */
function journalOk(host: LabHost, name: string): { ok: boolean; last: number; why: string } {
  const lines = readFileSync(homeFile(host, name, 'journal'), 'utf8')
    .trim()
    .split('\n')
    .map(Number);
  for (let i = 0; i < lines.length; i++) {
    if (lines[i] !== i + 1) return { ok: false, last: lines.at(-1) ?? 0, why: `line ${i + 1} is ${lines[i]}` };
  }
  return { ok: true, last: lines.at(-1) ?? 0, why: '' };
}

async function openMigrations(host: LabHost): Promise<string[]> {
  const records = await migrationRecords(hostEndpoint(host), 'test', false);
  return records
    .filter((r) => !['committed', 'aborted', 'resumed', 'discarded'].includes(r.state ?? ''))
    .map((r) => `${r.migrationId} ${r.state}`);
}

/** Migrates a fresh workload with `cell`'s fault armed, heals, lets the agents settle, and checks the outcome. */
async function runCell(cell: Cell, index: number): Promise<void> {
  const name = `w${index}`;
  const since = Date.now();
  // Its files are in its own directory (its working directory), which moves with it.
  await runWorkload(hostEndpoint(a), name, [stateful, '.', '1'], 'test');
  await sleep(300);

  // A full disk is a small one: the destination's images go to a 128 MiB tmpfs for this cell. Room
  // enough, above the 64 MiB the destination keeps free (IMAGE_STREAM_LIMITS), for the files carried
  // ahead of the freeze, so that the disk fills where the fault fills it.
  const smallDisk = cell.action === 'fill-images';
  if (smallDisk) await inHost(b, ['mount', '-t', 'tmpfs', '-o', 'size=128m', 'ferry-test', b.imagesDir]);
  const fault = { FERRY_TEST_FAULT: `${cell.point}=${cell.action}` };
  if (cell.action === 'criu-vanished') await vanishCriu();
  else if (cell.who === 'source agent') a = await restartAgent(LAB, 'a', { ...hostPauseEnv, ...fault });
  else if (cell.who === 'destination agent') b = await restartAgent(LAB, 'b', { ...hostPauseEnv, ...fault });
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
  rmSync(onHost(b, join(b.imagesDir, 'ballast')), { force: true });
  if (smallDisk) await inHost(b, ['umount', '-l', b.imagesDir]);
  if (cell.who === 'source agent') a = await restartAgent(LAB, 'a', hostPauseEnv);
  if (cell.who === 'destination agent') b = await restartAgent(LAB, 'b', hostPauseEnv);

  const host = await checkOutcome(name, `${cell.point}=${cell.action}`, since);
  expect(host).toBe(cell.endsOn);
  results.push(
    `  ${cell.who.padEnd(18)} ${`${cell.point}=${cell.action}`.padEnd(48)} exit ${migration}, one copy on ${host}`,
  );
}

/** Where the one copy must run: the source's journal is the authority on whether the migration committed. */
async function committedOnSource(since: number): Promise<boolean> {
  const records = await migrationRecords(hostEndpoint(a), 'test', false);
  return records.some((r) => r.role === 'source' && r.state === 'committed' && Number(r.updatedAtMs) >= since);
}

async function settled(name: string, since: number): Promise<boolean> {
  const copies = copiesOf(name);
  if (copies.length !== 1) return false;
  if ((await openMigrations(a)).length > 0 || (await openMigrations(b)).length > 0) return false;
  return copies[0]?.host === ((await committedOnSource(since)) ? 'b' : 'a');
}

/** Checks what must hold after any fault: one copy, its history intact, nothing left behind. Returns where it runs. */
async function checkOutcome(name: string, label: string, since: number): Promise<string | undefined> {
  await waitFor(() => settled(name, since), {
    what: `${label} to settle with exactly one copy where the source's journal says (now: ${JSON.stringify(copiesOf(name))})`,
    timeoutMs: 60_000,
    intervalMs: 250,
  });
  const [copy] = copiesOf(name);
  // The journal the one copy writes: its own host's file, which moved with it if it moved.
  const on = copy?.host === 'b' ? b : a;
  const before = journalOk(on, name);
  await waitFor(() => journalOk(on, name).last > before.last + 5, { what: 'the surviving copy to keep counting' });
  const after = journalOk(on, name);
  expect(after.ok, after.why).toBe(true);
  expect(readdirSync(onHost(a, a.imagesDir)).filter((n) => n.startsWith('m-'))).toEqual([]);
  expect(readdirSync(onHost(b, b.imagesDir)).filter((n) => n.startsWith('m-'))).toEqual([]);
  expect(copiesOf(name)).toHaveLength(1);
  // A machine PID from this machine's own /proc (copiesOf), not a host's.
  if (copy !== undefined) process.kill(copy.pid, 'SIGKILL');
  return copy?.host;
}

/** Pauses a migration at `point`, lets `kind` strike any party, releases, heals, and checks the outcome. */
async function runCrossCell(point: string, kind: Kind, index: number): Promise<void> {
  const name = `x${index}`;
  const since = Date.now();
  await runWorkload(hostEndpoint(a), name, [stateful, '.', '1'], 'test');
  await sleep(300);
  // Armed where the party that reaches the point looks: its own pause directory.
  const pauses = pauseDirOf(point);
  writeFileSync(join(pauses, 'armed'), point);
  const controller = spawn(ferry, ['migrate', name, '--from', 'a', '--to', 'b', '--hold', String(HOLD_MS)], {
    env: { ...process.env, FERRY_LAB: LAB, ...pauseEnv },
    stdio: 'ignore',
  });
  const exited = new Promise<number>((resolve) =>
    controller.once('exit', (code, signal) => resolve(code ?? (signal ? 137 : -1))),
  );
  const marker = join(pauses, point);
  await waitFor(() => existsSync(marker), { what: `the migration to reach ${point}`, timeoutMs: 30_000 });

  const blackhole = (host: LabHost, address: string): Promise<unknown> =>
    execFileAsync('ip', ['-n', host.netns, 'route', 'add', 'blackhole', `${address}/32`]);
  const controllerAddress = `${a.address.split('.').slice(0, 3).join('.')}.254`;
  if (kind === 'kill controller') controller.kill('SIGKILL');
  if (kind === 'kill source agent') process.kill(a.pid, 'SIGKILL');
  if (kind === 'kill destination agent') process.kill(b.pid, 'SIGKILL');
  if (kind === 'cut source↔destination') await Promise.all([blackhole(a, b.address), blackhole(b, a.address)]);
  if (kind === 'cut controller↔agents')
    await Promise.all([blackhole(a, controllerAddress), blackhole(b, controllerAddress)]);
  rmSync(marker, { force: true });

  const code = await exited;
  for (const h of [a, b]) await execFileAsync('ip', ['-n', h.netns, 'route', 'flush', 'type', 'blackhole']);
  if (kind === 'kill source agent') a = await restartAgent(LAB, 'a', hostPauseEnv);
  if (kind === 'kill destination agent') b = await restartAgent(LAB, 'b', hostPauseEnv);
  const host = await checkOutcome(name, `${kind} at ${point}`, since);
  results.push(`  ${kind.padEnd(24)} at ${point.padEnd(34)} exit ${code}, one copy on ${host}`);
}

let index = 0;
describe('fault matrix: every failure at every point of the switchover', () => {
  for (const point of POINTS) {
    for (const kind of KINDS) {
      const i = index++;
      it(`${kind} at ${point}: exactly one copy runs, nothing lost or repeated, nothing left`, () =>
        runCrossCell(point, kind, i));
    }
  }
});

describe('fault matrix: resources failing during the switchover', () => {
  for (const cell of resources) {
    const i = index++;
    it(`${cell.who}: ${cell.point}=${cell.action} → one copy runs on ${cell.endsOn}, nothing lost or repeated, nothing left`, () =>
      runCell(cell, i));
  }
});

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
