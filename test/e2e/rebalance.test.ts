import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostEndpoint, labDown, labUp, restartAgent, type Lab, type LabHost } from '../helpers/lab.js';
import type { MoveOutcome, NodeState, Plan, RunRecord } from '../../controller/fleet/index.js';
import { runWorkload } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { FERRY_BIN, runFerry, type CliResult } from '../helpers/cli.js';
import { counterOn, homeIn, inHost, runsOn } from '../helpers/hosts.js';
import { requireRoot } from '../helpers/root.js';
import { sleep, waitFor } from '../helpers/wait.js';

const LAB = `rb${process.pid % 100_000}`;
const MiB = 1024 * 1024;
const counter = join(projectRoot(), 'dist', 'examples', 'counter');
let lab: Lab;
const hosts: Record<string, LabHost> = {};
/** The controller's files (its configuration, the schedule's history and pause points): on this machine. */
const scratch = mkdtempSync(join(tmpdir(), 'ferry-rebalance-'));
/**
 * Every workload started, by name: the host it runs on as far as the test
 * knows (its state file, "PID COUNT", is in its own directory there).
 */
const started = new Map<string, { host: string }>();

const ferry = (...args: string[]): Promise<CliResult> =>
  runFerry(args, { FERRY_LAB: LAB, FERRY_CONFIG: join(scratch, 'config') });

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB, hosts: 3, capacityBytes: 512 * MiB });
  for (const h of lab.hosts) hosts[h.host] = h;
}, 120_000);

afterAll(async () => {
  // Taking the hosts down takes their workloads with them.
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

/** A counting workload holding `mb` MiB, on a lab host; its state file in its own directory, which moves with it. */
async function start(host: string, name: string, mb: number): Promise<void> {
  await runWorkload(hostEndpoint(hosts[host] as LabHost), name, [counter, 'state', '20', String(mb), '1'], 'test');
  started.set(name, { host });
  await waitFor(() => count(name) > 2, { what: `${name} to count` });
}

/** The workload's count, read on the host it runs on (moved() tells the test where it went). */
function count(name: string): number {
  const host = hosts[started.get(name)?.host ?? ''];
  return host === undefined ? 0 : (counterOn(host, name)?.count ?? 0);
}

/** The test learns that a workload now runs on another host. */
function moved(name: string, host: string): void {
  started.set(name, { host });
}

/** The host's PID runs as this workload there: a live process in the workload's own directory on that host. */
async function runsAs(host: LabHost, pid: number, name: string): Promise<boolean> {
  if (!runsOn(host, pid)) return false;
  const cwd = await inHost(host, ['readlink', `/proc/${pid}/cwd`]).catch(() => '');
  return cwd.trim() === homeIn(host, name);
}

async function nodes(): Promise<NodeState[]> {
  const r = await ferry('nodes', '--json');
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as NodeState[];
}

/** The workload's PID as its agent sees it (the state file has the PID inside its own PID namespace). */
const pidOf = (all: NodeState[], workload: string): number =>
  all.flatMap((n) => n.workloads).find((w) => w.name === workload)?.pid ?? 0;

const where = (all: NodeState[], workload: string): string | undefined =>
  all.find((n) => n.workloads.some((w) => w.name === workload))?.name;

/** The test follows every workload to where the agents now list it. */
function track(all: NodeState[]): void {
  for (const n of all) for (const w of n.workloads) if (started.has(w.name)) moved(w.name, n.name);
}

describe('rebalancing across three lab hosts', () => {
  it('plans moves for an unbalanced set: from the loaded node, fewest moves, every node under the threshold', async () => {
    // 3 nodes × 512 MiB; 10 workloads of about 24 MiB: eight on a (about 40 %), two on b, none on c.
    for (let i = 1; i <= 8; i++) await start('a', `w${i}`, 24);
    for (let i = 9; i <= 10; i++) await start('b', `w${i}`, 24);
    const before = await nodes();
    expect(before.map((n) => [n.name, n.workloads.length])).toEqual([
      ['a', 8],
      ['b', 2],
      ['c', 0],
    ]);
    const r = await ferry('rebalance', '--plan', '--threshold', '20%', '--json');
    expect(r.code, r.stderr).toBe(0);
    const { plan, planMs } = JSON.parse(r.stdout) as { plan: Plan; planMs: number };
    console.log(`plan for 3 nodes x 10 workloads: ${plan.moves.length} moves in ${planMs} ms`);
    expect(plan.moves.length).toBeGreaterThanOrEqual(3);
    expect(plan.moves.length).toBeLessThanOrEqual(5);
    for (const m of plan.moves) {
      expect(m.from).toBe('a');
      expect(['b', 'c']).toContain(m.to);
      expect(m.reason).toMatch(/^a at \d+ % memory, over the 20 % threshold$/);
    }
    for (const n of plan.nodes) expect(n.pressureAfter).toBeLessThanOrEqual(0.2);
    const human = await ferry('rebalance', '--threshold', '20%');
    expect(human.stdout).toMatch(/WORKLOAD\s+FROM\s+TO\s+SIZE\s+WHY/);
    expect(human.stdout).toMatch(/--apply makes these moves/);
  });

  it('--apply makes the moves, at most one per node at a time; the workloads keep their state; then nothing is left to do', async () => {
    const counts = new Map([...started.keys()].map((name) => [name, count(name)]));
    const r = await ferry('rebalance', '--apply', '--threshold', '20%', '--json');
    expect(r.code, r.stderr).toBe(0);
    const { outcomes, planMs, applyMs } = JSON.parse(r.stdout) as {
      outcomes: MoveOutcome[];
      planMs: number;
      applyMs: number;
    };
    console.log(`apply for 3 nodes x 10 workloads: ${outcomes.length} moves, plan ${planMs} ms, apply ${applyMs} ms`);
    expect(outcomes.length).toBeGreaterThanOrEqual(3);
    expect(outcomes.every((o) => o.status === 'moved')).toBe(true);
    // No node is in two migrations at once.
    for (const x of outcomes) {
      for (const y of outcomes) {
        if (x === y) continue;
        const shared = [x.move.from, x.move.to].some((n) => n === y.move.from || n === y.move.to);
        const overlap = (x.startedAtMs ?? 0) < (y.finishedAtMs ?? 0) && (y.startedAtMs ?? 0) < (x.finishedAtMs ?? 0);
        expect(shared && overlap, `${x.move.workload} and ${y.move.workload}`).toBe(false);
      }
    }
    const after = await nodes();
    for (const o of outcomes) {
      expect(where(after, o.move.workload)).toBe(o.move.to);
      const pid = pidOf(after, o.move.workload);
      expect(await runsAs(hosts[o.move.to] as LabHost, pid, o.move.workload), `${o.move.workload} PID ${pid}`).toBe(
        true,
      );
      moved(o.move.workload, o.move.to);
    }
    // Everyone counts on from where it was: state kept across the move.
    for (const [name, before] of counts) {
      await waitFor(() => count(name) > before + 1, { what: `${name} to count on` });
    }
    const again = JSON.parse((await ferry('rebalance', '--threshold', '20%', '--json')).stdout) as { plan: Plan };
    expect(again.plan.moves).toEqual([]);
  });

  it('reports a failing move, leaves that workload running where it was, and makes the other moves', async () => {
    // c's restores fail from now on; b gets overloaded with six more workloads, more than c can take.
    await restartAgent(LAB, 'c', { FERRY_TEST_FAULT: 'destination.before-restore=break-images' });
    try {
      await failingMoves();
    } finally {
      await restartAgent(LAB, 'c');
    }
  });

  async function failingMoves(): Promise<void> {
    for (let i = 11; i <= 16; i++) await start('b', `w${i}`, 24);
    // 16 workloads of 25 MiB on 3 × 512 MiB: 30 % leaves room for all, 20 % would not.
    const planned = JSON.parse((await ferry('rebalance', '--threshold', '30%', '--json')).stdout) as { plan: Plan };
    expect(planned.plan.moves.some((m) => m.to === 'c')).toBe(true);
    expect(planned.plan.moves.some((m) => m.to !== 'c')).toBe(true);
    const r = await ferry('rebalance', '--apply', '--threshold', '30%', '--max-failures', '10');
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/\d+ moved, \d+ failed, 0 not started/);
    expect(r.stdout).toMatch(/failed\s+w\d+ b → c: migration failed during switchover/);
    const after = await nodes();
    track(after);
    const failures = [...r.stdout.matchAll(/failed\s+(w\d+) b → c/g)].map((m) => m[1] ?? '');
    expect(failures.length).toBeGreaterThan(0);
    for (const name of failures) {
      expect(where(after, name)).toBe('b');
      const pid = pidOf(after, name);
      expect(await runsAs(hosts.b as LabHost, pid, name), `${name} PID ${pid}`).toBe(true);
      const c = count(name);
      await waitFor(() => count(name) > c, { what: `${name} to keep counting on b` });
    }
    expect(r.stdout).toMatch(/^[1-9]\d* moved/m);
  }

  it('drain empties a node and marks it draining; rebalancing places nothing there until undrain', async () => {
    const before = await nodes();
    const onB = before.find((n) => n.name === 'b')?.workloads.map((w) => w.name) ?? [];
    expect(onB.length).toBeGreaterThan(0);
    const r = await ferry('drain', 'b');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/b is empty and draining/);
    const after = await nodes();
    track(after);
    const b = after.find((n) => n.name === 'b');
    expect(b?.workloads).toEqual([]);
    expect(b?.draining).toBe(true);
    for (const name of onB) expect(['a', 'c']).toContain(where(after, name));
    // A plan with a threshold everyone is over still sends nothing to b.
    const p = JSON.parse((await ferry('rebalance', '--threshold', '1%', '--json')).stdout) as { plan: Plan };
    expect(p.plan.moves.every((m) => m.to !== 'b')).toBe(true);
    // And the agent itself refuses to take a workload.
    const direct = await ferry('migrate', onB[0] ?? '', '--from', where(after, onB[0] ?? '') ?? '', '--to', 'b');
    expect(direct.code).toBe(2);
    expect(direct.stderr).toMatch(/b is draining and takes no workloads/);
    expect((await ferry('undrain', 'b')).code).toBe(0);
    expect((await nodes()).find((n) => n.name === 'b')?.draining).toBe(false);
  });

  it('a schedule with a short interval runs again and again, never two runs at once', async () => {
    const pause = mkdtempSync(join(scratch, 'pause-'));
    const history = join(scratch, 'history.jsonl');
    // The first run waits at a pause point for 2.5 s: the ticks meanwhile must be skipped, not overlap.
    writeFileSync(join(pause, 'armed'), 'schedule.run');
    const daemon = spawn(FERRY_BIN, ['schedule', '--cron', '*/1 * * * * *', '--dry-run', '--history', history], {
      env: {
        ...process.env,
        FERRY_LAB: LAB,
        FERRY_CONFIG: join(scratch, 'config'),
        FERRY_TEST_PAUSE_DIR: pause,
        FERRY_LOG: 'info',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    daemon.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => daemon.once('exit', (code) => resolve(code)));
    try {
      await waitFor(() => existsSync(join(pause, 'schedule.run')), { what: 'the first run to reach its pause' });
      await sleep(2_500);
      rmSync(join(pause, 'schedule.run'));
      await waitFor(() => existsSync(history) && readFileSync(history, 'utf8').trim().split('\n').length >= 3, {
        what: 'three runs in the history',
        timeoutMs: 20_000,
      });
    } finally {
      daemon.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
    const runs = readFileSync(history, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as RunRecord);
    expect(runs[0]?.mode).toBe('dry-run');
    expect(runs.every((r) => r.outcome === 'ok')).toBe(true);
    for (let i = 1; i < runs.length; i++) {
      expect(Date.parse(runs[i]?.startedAt ?? '')).toBeGreaterThanOrEqual(Date.parse(runs[i - 1]?.finishedAt ?? ''));
    }
    expect(Date.parse(runs[0]?.finishedAt ?? '') - Date.parse(runs[0]?.startedAt ?? '')).toBeGreaterThanOrEqual(2_400);
    expect(stderr).toMatch(/skipped a tick, the previous run is still going/);
  });

  it('refuses bad input with exit code 2', async () => {
    for (const [args, message] of [
      [['rebalance', '--threshold', '150%'], /not a threshold/],
      [['rebalance', '--exclude', 'Bad Key'], /not a label selector/],
      [['rebalance', '--plan', '--apply'], /pick one/],
      [['schedule', '--cron', 'every minute'], /not a cron expression/],
      [['rebalance', '--node', 'nowhere'], /unknown agent "nowhere"/],
    ] as const) {
      const r = await ferry(...args);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(message);
    }
  });
});
