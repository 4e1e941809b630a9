/**
 * The breadth suite: one migration per kind of process state, between lab
 * hosts that share nothing but the kernel. Each kind either moves intact
 * (the process goes on checking that its state still works, on b) or is
 * refused before anything is touched (exit 2, the process still runs on a,
 * b holds nothing of it): never frozen and then failed.
 */
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostEndpoint, labDown, labUp, type Lab, type LabHost } from '../helpers/lab.js';
import { migrate } from '../../controller/migration/index.js';
import { runWorkload } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { runFerry } from '../helpers/cli.js';
import { homeFile, homeIn, killOn, onHost, runsOn, workloadPidsOn } from '../helpers/hosts.js';
import { requireRoot } from '../helpers/root.js';
import { waitFor } from '../helpers/wait.js';

const LAB = `fk${process.pid % 100_000}`;
const KINDS = join(projectRoot(), 'test', 'helpers', 'clients', 'kinds.py');
let lab: Lab;
let a: LabHost;
let b: LabHost;

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB });
  [a, b] = lab.hosts as [LabHost, LabHost];
}, 60_000);

afterAll(async () => {
  await labDown(LAB);
});

/** The workload's own account on a host: how many checks it made, and what the last one found. */
function progress(h: LabHost, name: string): { tick: number; status: string } {
  try {
    const [tick, ...status] = readFileSync(homeFile(h, name, 'progress'), 'utf8')
      .trim()
      .split(' ');
    return { tick: Number(tick), status: status.join(' ') };
  } catch {
    return { tick: 0, status: 'no progress file' };
  }
}

/** Starts kinds.py KIND on a and waits for its checks to pass there. */
async function start(name: string, argv: string[], placement: { carry?: string[] } = {}): Promise<number> {
  const w = await runWorkload(hostEndpoint(a), name, argv, 'test', placement);
  await waitFor(() => progress(a, name).tick >= 5, {
    what: `${name} to check its state on a (${JSON.stringify(progress(a, name))})`,
    timeoutMs: 20_000,
  });
  expect(progress(a, name).status).toBe('ok');
  return w.pid ?? 0;
}

/** Migrates it to b; it must go on checking there, every check passing, and be gone from a. */
async function movesIntact(name: string, oldPid: number): Promise<void> {
  const report = await migrate({ workload: name, from: hostEndpoint(a), to: hostEndpoint(b), softwareVersion: 'test' });
  const frozenAt = progress(b, name).tick;
  expect(frozenAt, 'the carried progress file continues from where it was').toBeGreaterThan(4);
  await waitFor(() => progress(b, name).tick >= frozenAt + 35, {
    what: `${name} to go on checking on b (${JSON.stringify(progress(b, name))})`,
    timeoutMs: 20_000,
  });
  expect(progress(b, name).status).toBe('ok');
  expect(runsOn(b, report.to.pid)).toBe(true);
  await waitFor(() => !runsOn(a, oldPid), { what: 'the source copy to end' });
  await killOn(b, report.to.pid);
}

/** The CLI refuses the move with exit 2; the process runs on a, checking; b holds nothing of it. */
async function refused(name: string, pid: number, why: RegExp): Promise<void> {
  const imagesBefore = readdirSync(onHost(b, b.imagesDir));
  const { code, stderr } = await runFerry(['migrate', name, '--from', 'a', '--to', 'b'], { FERRY_LAB: LAB });
  expect(code, stderr).toBe(2);
  expect(stderr).toMatch(why);
  expect(stderr).toMatch(/nothing was touched|install the same files/);
  const tick = progress(a, name).tick;
  await waitFor(() => progress(a, name).tick > tick + 3, { what: `${name} to go on checking on a` });
  expect(progress(a, name).status).toBe('ok');
  expect(runsOn(a, pid)).toBe(true);
  expect(readdirSync(onHost(b, b.imagesDir))).toEqual(imagesBefore);
  expect(existsSync(onHost(b, homeIn(b, name)))).toBe(false);
  expect(workloadPidsOn(b)).toEqual([]);
  await killOn(a, pid);
}

describe('every kind of process state, between hosts that share nothing', () => {
  const moving: [string, string][] = [
    ['threads', 'three threads that keep counting'],
    ['session', 'a session leader and a child in its process group, a pipe between them'],
    ['zombie', 'a child that exited and was not reaped yet, reaped after the move with its status'],
    ['pipe', 'a pipe holding unread data'],
    ['fifo', 'a named pipe in its own directory, holding unread data'],
    ['unix-stream', 'a unix stream socket pair, and a listening socket bound in its directory'],
    ['unix-dgram', 'a unix datagram socket pair, and a socket bound in its directory'],
    ['unix-seqpacket', 'a unix seqpacket socket pair, and a listening socket bound in its directory'],
    ['eventfd', 'an eventfd'],
    ['signalfd', 'a signalfd for SIGUSR1'],
    ['epoll', 'an epoll instance watching a pipe'],
    ['inotify', 'an inotify watch on a directory it carries'],
    ['memfd', 'a memfd holding data'],
    ['deleted', 'a file deleted but still open (CRIU carries it as a ghost file)'],
    ['flock', 'a flock() lock'],
    ['posix', 'a POSIX record lock (lockf)'],
    ['ofd', 'an open file description lock (F_OFD_SETLK)'],
    ['sqlite', 'a SQLite database in the middle of a transaction, committed after the move'],
  ];
  for (const [kind, what] of moving) {
    it(`moves ${what}`, async () => {
      const name = `k-${kind}`;
      const pid = await start(name, ['python3', KINDS, kind]);
      await movesIntact(name, pid);
    });
  }

  it('moves a file outside its directory that it was started with --carry for', async () => {
    mkdirSync(onHost(a, '/srv/carried'), { recursive: true });
    writeFileSync(onHost(a, '/srv/carried/data'), 'only on a, and carried\n');
    const pid = await start('k-carried', ['python3', KINDS, 'open-file', '/srv/carried/data'], {
      carry: ['/srv/carried'],
    });
    await movesIntact('k-carried', pid);
    expect(readFileSync(onHost(b, '/srv/carried/data'), 'utf8')).toBe('only on a, and carried\n');
  });

  it('refuses a file that exists only on the source, saying what to do', async () => {
    mkdirSync(onHost(a, '/srv/only-a'), { recursive: true });
    writeFileSync(onHost(a, '/srv/only-a/data'), 'only on a\n');
    const pid = await start('k-only-a', ['python3', KINDS, 'open-file', '/srv/only-a/data']);
    await refused('k-only-a', pid, /open \/srv\/only-a\/data is missing on b/);
  });

  it('refuses an executable that differs on the destination', async () => {
    for (const h of [a, b]) {
      mkdirSync(onHost(h, '/opt/kinds'), { recursive: true });
      copyFileSync('/bin/sleep', onHost(h, '/opt/kinds/sleeper'));
    }
    // Another build on b: the same size, one byte different.
    const other = readFileSync(onHost(b, '/opt/kinds/sleeper'));
    other.writeUInt8(other.readUInt8(other.length - 1) ^ 0xff, other.length - 1);
    writeFileSync(onHost(b, '/opt/kinds/sleeper'), other, { mode: 0o755 });
    const w = await runWorkload(hostEndpoint(a), 'k-sleeper', ['/opt/kinds/sleeper', '600'], 'test');
    const { code, stderr } = await runFerry(['migrate', 'k-sleeper', '--from', 'a', '--to', 'b'], { FERRY_LAB: LAB });
    expect(code, stderr).toBe(2);
    expect(stderr).toMatch(/exe \/opt\/kinds\/sleeper has other content \(another build of it\) on b/);
    expect(runsOn(a, w.pid ?? 0)).toBe(true);
    expect(workloadPidsOn(b)).toEqual([]);
    await killOn(a, w.pid ?? 0);
  });

  it('refuses a path under /proc/PID of its own tree, which that PID will not name on b', async () => {
    const pid = await start('k-proc', ['python3', KINDS, 'open-file', '/proc/self/status']);
    await refused('k-proc', pid, /proc \/proc\/\d+\/status names a process of the tree by its PID here/);
  });

  it('refuses a file deleted but still open that is over CRIU’s ghost limit', async () => {
    const pid = await start('k-big-ghost', ['python3', KINDS, 'deleted', String(128 * 1024)]);
    await refused(
      'k-big-ghost',
      pid,
      /gone is deleted but still open and holds 2\.0 MiB: CRIU carries such a file .* up to 1\.0 MiB/,
    );
  });

  it('refuses a periodic timerfd, which CRIU would bring back disarmed', async () => {
    const pid = await start('k-timerfd', ['python3', KINDS, 'timerfd']);
    await refused('k-timerfd', pid, /holds a periodic timerfd .* disarmed/);
  });

  it('refuses a process in a mount namespace of its own, with the reason', async () => {
    const pid = await start('k-mntns', ['unshare', '-m', '--propagation', 'private', 'python3', KINDS, 'threads']);
    await refused('k-mntns', pid, /runs in a mount namespace of its own .*criu\/mount\.c:48/);
  });

  it('refuses a descriptor CRIU cannot dump (a perf event counter)', async () => {
    const pid = await start('k-perf', ['python3', KINDS, 'perf']);
    await refused('k-perf', pid, /holds a perf_event descriptor \(fd \d+\), which CRIU cannot dump/);
  });
});
