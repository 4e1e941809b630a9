import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostEndpoint, labDown, labUp, type Lab, type LabHost } from '../helpers/lab.js';
import type { MigrationReport } from '../../controller/migration/index.js';
import { listWorkloads, runWorkload } from '../../controller/agents/index.js';
import { LAZY_PIPE_BYTES } from '../../src/criu/index.js';
import { projectRoot } from '../../src/paths.js';
import { FERRY_BIN, runFerry, type CliResult } from '../helpers/cli.js';
import { commandPidOn, counterOn, enterHostArgs, killOn, onHost } from '../helpers/hosts.js';
import { requireRoot } from '../helpers/root.js';
import { waitFor } from '../helpers/wait.js';

/**
 * Post-copy between two lab hosts, with the real CRIU and kernel. What
 * decides whether it works on this kernel is fs.pipe-max-size (CRIU 4.1's
 * lazy page server needs 4 MiB pipes and has no CAP_SYS_RESOURCE here:
 * docs/postcopy.md), a machine-wide setting: the test sets it both ways
 * and puts the original back.
 */
const LAB = `pc${process.pid % 100_000}`;
const PIPE_MAX_SIZE = '/proc/sys/fs/pipe-max-size';
let lab: Lab;
let a: LabHost;
let b: LabHost;
let c: LabHost;
let original: string;
/** The controller's own files (its pause points): on this machine, where the test runs it. */
const scratch = mkdtempSync(join(tmpdir(), 'ferry-postcopy-'));
const ferry = (...args: string[]): Promise<CliResult> => runFerry(args, { FERRY_LAB: LAB });

beforeAll(async () => {
  requireRoot();
  original = readFileSync(PIPE_MAX_SIZE, 'utf8').trim();
  // c holds a client connection to a workload's service address.
  lab = await labUp({ name: LAB, hosts: 3 });
  [a, b, c] = lab.hosts as [LabHost, LabHost, LabHost];
}, 120_000);

afterAll(async () => {
  writeFileSync(PIPE_MAX_SIZE, original);
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

/**
 * A counter of MEMORY MiB on a that reads back all of its memory every half second ("corrupt" if a page
 * lost it). Its state file is in its own directory, which moves with it.
 */
async function startCounter(name: string, memoryMb: number): Promise<void> {
  const counter = join(projectRoot(), 'dist', 'examples', 'counter');
  await runWorkload(hostEndpoint(a), name, [counter, 'state', '20', String(memoryMb), '1', '0', '25'], 'test');
  await waitFor(() => count(a, name) > 30, { what: `${name} to fault its memory in and count`, timeoutMs: 60_000 });
}

async function names(host: LabHost): Promise<string[]> {
  return (await listWorkloads(hostEndpoint(host), 'test')).map((w) => w.name ?? '');
}

/** A counter's count, in its state file on a host. */
function count(host: LabHost, name: string): number {
  return counterOn(host, name)?.count ?? 0;
}

function corrupt(host: LabHost, name: string): boolean {
  return counterOn(host, name)?.corrupt === true;
}

/** A host's PIDs whose command line (its words joined by spaces) matches. */
function pidsOn(host: LabHost, pattern: RegExp): number[] {
  return readdirSync(onHost(host, '/proc'))
    .filter((e) => /^\d+$/.test(e))
    .filter((e) => {
      try {
        return pattern.test(readFileSync(onHost(host, `/proc/${e}/cmdline`), 'utf8').replace(/\0/g, ' '));
      } catch {
        return false; // gone meanwhile
      }
    })
    .map(Number);
}

describe('post-copy', () => {
  it('is refused in preflight, with the reason, where the probe shows it failing; the process runs on', async () => {
    writeFileSync(PIPE_MAX_SIZE, String(1024 * 1024));
    await startCounter('refused', 16);
    const result = await ferry('migrate', 'refused', '--from', 'a', '--to', 'b', '--strategy', 'postcopy');
    expect(result.code).toBe(2);
    expect(result.stderr).toContain('post-copy does not work on a and b');
    expect(result.stderr).toContain('fs.pipe-max-size is 1048576');
    expect(result.stderr).toContain('splice: -1: Bad file descriptor');
    expect(result.stderr).toContain(`sysctl -w fs.pipe-max-size=${LAZY_PIPE_BYTES}`);
    // Nothing moved: the workload is still a's, and counts on.
    const before = count(a, 'refused');
    await waitFor(() => count(a, 'refused') > before + 5, { what: 'the counter to go on counting on a' });
    expect(await names(a)).toContain('refused');
    expect(await names(b)).not.toContain('refused');
    expect(corrupt(a, 'refused')).toBe(false);
  }, 120_000);

  it('moves a service with an established connection from another host: the client goes on, nothing lost', async () => {
    writeFileSync(PIPE_MAX_SIZE, String(LAZY_PIPE_BYTES));
    const ip = `${a.address.replace(/\.\d+$/, '')}.60`;
    const started = await ferry(
      'run',
      '--on',
      'a',
      '--name',
      'pc-echo',
      '--address',
      `${ip}/24`,
      '--',
      'python3',
      join(projectRoot(), 'examples', 'echo.py'),
      '--port',
      '9000',
    );
    expect(started.code, started.stderr).toBe(0);
    // The client runs in host c and writes its result in c's own /tmp.
    const out = '/tmp/pc-echo.json';
    const argv = ['python3', join(projectRoot(), 'test', 'helpers', 'clients', 'echo_client.py'), ip, '9000', out];
    const client = spawn('nsenter', [...enterHostArgs(c), ...argv], { stdio: 'ignore' });
    const exited = new Promise((resolve) => client.once('exit', resolve));
    const echoed = (): number =>
      existsSync(onHost(c, `${out}.count`)) ? Number(readFileSync(onHost(c, `${out}.count`), 'utf8') || 0) : 0;
    try {
      await waitFor(() => echoed() > 20, { what: 'the client to echo', timeoutMs: 15_000 });
      const result = await ferry('migrate', 'pc-echo', '--from', 'a', '--to', 'b', '--strategy', 'postcopy', '--json');
      expect(result.code, result.stderr).toBe(0);
      expect(result.stderr).toMatch(/tcp-established .*:9000 ↔ .*: moves/);
      const after = echoed();
      await waitFor(() => echoed() > after + 20, { what: 'echoes from b', timeoutMs: 15_000 });
    } finally {
      // To the client itself: nsenter does not pass a signal on to what it started in the host.
      await killOn(c, commandPidOn(c, argv) ?? 0, 'TERM');
    }
    await waitFor(() => existsSync(onHost(c, out)), { what: 'the client to write its result', timeoutMs: 10_000 });
    await exited; // its result written whole
    const summary = JSON.parse(readFileSync(onHost(c, out), 'utf8')) as {
      errors: string[];
      echoed: number;
      max_gap_ms: number;
    };
    console.log(`post-copy with a connection: ${summary.echoed} echoes, longest gap ${summary.max_gap_ms} ms`);
    expect(summary.errors).toEqual([]);
    expect(await names(b)).toContain('pc-echo');
    // Once every page arrived, the source removes CRIU's lock table.
    const nft = join(projectRoot(), '.criu', 'bin', 'nft');
    const tables = (): string =>
      spawnSync('ip', ['netns', 'exec', a.netns, nft, 'list', 'tables'], { encoding: 'utf8' }).stdout.trim();
    await waitFor(() => tables() === '', { what: 'CRIU’s lock table to go from a', timeoutMs: 10_000 });
  }, 120_000);

  it('moves 256 MiB and 1 GiB with a downtime that does not grow with the memory, every page intact', async () => {
    writeFileSync(PIPE_MAX_SIZE, String(LAZY_PIPE_BYTES));
    const reports: MigrationReport[] = [];
    const moved: string[] = [];
    for (const [name, memoryMb] of [
      ['small', 256],
      ['large', 1024],
    ] as const) {
      await startCounter(name, memoryMb);
      moved.push(name);
      const result = await ferry('migrate', name, '--from', 'a', '--to', 'b', '--strategy', 'postcopy', '--json');
      expect(result.code, result.stderr).toBe(0);
      const report = JSON.parse(result.stdout) as MigrationReport;
      reports.push(report);
      expect(report.strategy).toBe('postcopy');
      expect(result.stderr).toContain('probes on both agents showed lazy migration working');
      expect(result.stderr).toContain('every page arrived from a');
      // The fetch tells its progress twice a second: bytes here, of the resident size, rate, time left.
      if (memoryMb >= 1024) {
        expect(result.stderr).toMatch(
          /postcopy +b +pages \[[#.]+\] [\d.]+ [MG]iB of ~[\d.]+ [MG]iB at [\d.]+ [MG]iB\/s, ~[\d.]+ m?s left/,
        );
      }
      // The memory went after the switchover, not in it.
      expect(report.postcopy?.lazyPages).toBeGreaterThan(((memoryMb * 1024 * 1024) / 4096) * 0.9);
      expect(report.final.imageBytes).toBeLessThan(8 * 1024 * 1024);
      expect(report.postcopy?.risk).toContain('losing the source');
      // The copy on b counts on from where a stopped (in the state file that moved with it), and reads all
      // its memory back intact.
      const after = count(b, name);
      expect(after).toBeGreaterThan(30);
      await waitFor(() => count(b, name) > after + 50 || corrupt(b, name), { what: `${name} to count on b` });
      expect(corrupt(b, name)).toBe(false);
      expect(await names(b)).toContain(name);
      expect(await names(a)).not.toContain(name);
    }
    const [small, large] = reports as [MigrationReport, MigrationReport];
    console.log(
      `post-copy downtime: 256 MiB ${small.downtimeMs} ms (memory fetched in ${small.postcopy?.fetchMs} ms), ` +
        `1 GiB ${large.downtimeMs} ms (fetched in ${large.postcopy?.fetchMs} ms)`,
    );
    // Four times the memory: stop-and-copy's downtime grows about fourfold; post-copy's must not grow with it.
    expect(large.downtimeMs).toBeLessThan(small.downtimeMs * 2 + 250);
    // The fetch does grow: that is where the memory went.
    expect(large.postcopy!.fetchMs).toBeGreaterThan(small.postcopy!.fetchMs);
    await sleep(600);
    for (const name of moved) expect(corrupt(b, name)).toBe(false);
  }, 300_000);

  it('losing the fetch after the switchover kills the incomplete copy and the source continues', async () => {
    writeFileSync(PIPE_MAX_SIZE, String(LAZY_PIPE_BYTES));
    await startCounter('cut', 1024);
    const child = spawn(FERRY_BIN, ['migrate', 'cut', '--from', 'a', '--to', 'b', '--strategy', 'postcopy'], {
      env: { ...process.env, FERRY_LAB: LAB },
    });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const code = new Promise<number | null>((resolve) => child.once('exit', resolve));
    await waitFor(() => stderr.includes('fetching its memory from a'), { what: 'the copy on b to run' });
    // The daemon fetching b's memory dies mid-way (as with a lost link or source).
    const daemons = pidsOn(b, new RegExp(`lazy-pages .*${b.imagesDir}`));
    expect(daemons.length).toBeGreaterThan(0);
    for (const pid of daemons) await killOn(b, pid);
    expect(await code).toBe(1);
    expect(stderr).toContain('post-copy failed');
    expect(stderr).toContain('the process continues on a from the switchover');
    // The copy on b had holes in its memory: gone. The source copy counts on, its memory whole.
    expect(await names(b)).not.toContain('cut');
    expect(await names(a)).toContain('cut');
    const before = count(a, 'cut');
    await waitFor(() => count(a, 'cut') > before + 50 || corrupt(a, 'cut'), { what: 'the source copy to count on' });
    expect(corrupt(a, 'cut')).toBe(false);
  }, 180_000);

  it('a controller lost before the commit: the source stops serving and its process runs on', async () => {
    writeFileSync(PIPE_MAX_SIZE, String(LAZY_PIPE_BYTES));
    await startCounter('orphan', 64);
    const pause = join(scratch, 'pause');
    mkdirSync(pause, { recursive: true });
    writeFileSync(join(pause, 'armed'), 'controller.after-held');
    const child = spawn(FERRY_BIN, ['migrate', 'orphan', '--from', 'a', '--to', 'b', '--strategy', 'postcopy'], {
      env: { ...process.env, FERRY_LAB: LAB, FERRY_TEST_PAUSE_DIR: pause },
      stdio: 'ignore',
    });
    // The source froze the process and serves its memory; the controller dies there.
    await waitFor(() => existsSync(join(pause, 'controller.after-held')), { what: 'the source to serve' });
    const frozen = count(a, 'orphan');
    await sleep(300);
    expect(count(a, 'orphan')).toBe(frozen);
    child.kill('SIGKILL');
    await waitFor(() => count(a, 'orphan') > frozen + 20, { what: 'the source process to run on', timeoutMs: 30_000 });
    expect(corrupt(a, 'orphan')).toBe(false);
    expect(await names(a)).toContain('orphan');
    expect(await names(b)).not.toContain('orphan');
  }, 120_000);
});
