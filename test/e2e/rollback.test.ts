import { execFile } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FERRY_BIN } from '../helpers/cli.js';
import { hostEndpoint, labDown, labUp, type LabHost } from '../helpers/lab.js';
import { projectRoot } from '../../src/paths.js';
import { runWorkload } from '../../controller/agents/index.js';
import { requireRoot } from '../helpers/root.js';
import { sleep, waitFor } from '../helpers/wait.js';
import { isRunning } from '../helpers/workload.js';

const execFileAsync = promisify(execFile);
const LAB = `fr${process.pid % 100_000}`;
const examples = join(projectRoot(), 'dist', 'examples');
const ferry = FERRY_BIN;
const scratch = mkdtempSync(join(tmpdir(), 'ferry-rollback-'));
let a: LabHost;
let breaksImages: LabHost;
let corruptsImages: LabHost;

beforeAll(async () => {
  requireRoot();
  // Host b's agent deletes an image before restoring, so CRIU's restore fails;
  // host c's flips a byte of a received image, so its checksum does not match.
  const lab = await labUp({
    name: LAB,
    hosts: 3,
    agentEnv: {
      b: { FERRY_TEST_FAULT: 'destination.before-restore=break-images' },
      c: { FERRY_TEST_FAULT: 'destination.images-done=corrupt' },
    },
  });
  [a, breaksImages, corruptsImages] = lab.hosts as [LabHost, LabHost, LabHost];
}, 60_000);

afterAll(async () => {
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

function count(dir: string): { pid: number; count: number } {
  const [pid, n] = readFileSync(join(dir, 'state'), 'utf8').trim().split(/\s+/).map(Number);
  return { pid: pid ?? 0, count: n ?? 0 };
}

async function migrateCli(name: string, to: string): Promise<{ code: number; stderr: string }> {
  try {
    await execFileAsync(ferry, ['migrate', name, '--from', 'a', '--to', to], {
      env: { ...process.env, FERRY_LAB: LAB },
    });
    return { code: 0, stderr: '' };
  } catch (error) {
    const e = error as { code?: number; stderr?: string };
    return { code: e.code ?? -1, stderr: e.stderr ?? '' };
  }
}

describe('a migration that fails on the destination', () => {
  for (const [label, host] of [
    ['the restore fails on the destination', () => breaksImages],
    ['an image arrives corrupted', () => corruptsImages],
  ] as const) {
    it(`leaves the process running on the source, unchanged, when ${label}`, async () => {
      const dir = mkdtempSync(join(scratch, 'w-'));
      const name = `victim-${host().host}`;
      const w = await runWorkload(
        hostEndpoint(a),
        name,
        [join(examples, 'counter'), join(dir, 'state'), '20', '16', '1'],
        'test',
      );
      const pid = w.pid ?? 0;
      await sleep(200);

      const { code, stderr } = await migrateCli(name, host().host);
      expect(code, stderr).toBe(1);
      expect(stderr).toMatch(/The process still runs on a, unchanged/);

      // Same process, still counting, from where it was (no restart from 1).
      expect(isRunning(pid)).toBe(true);
      const after = count(dir);
      expect(after.pid).toBe(1); // PID 1 inside its own namespace, as before
      await waitFor(() => count(dir).count > after.count, { what: 'the source to keep counting' });
      // The destination kept nothing: no images, no restored copy.
      expect(readdirSync(host().imagesDir)).toEqual([]);
      const { stdout } = await execFileAsync('ip', ['netns', 'pids', host().netns]);
      const exes = stdout
        .split(/\s+/)
        .filter(Boolean)
        .map((p) => readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0')[0] ?? '');
      expect(exes.filter((e) => e.endsWith('counter'))).toEqual([]);
      process.kill(pid, 'SIGKILL');
    });
  }
});

describe('a migration that fails on the source', () => {
  it('keeps a process CRIU cannot dump running, and says why', async () => {
    // CRIU refuses a process holding a file lock unless asked for file_locks,
    // which Ferry does not yet do (CRIU 4.2 dumps the TCP listener this test
    // held before); when locks move, this needs another undumpable resource.
    const lockFile = join(mkdtempSync(join(tmpdir(), 'ferry-lock-')), 'lock');
    const w = await runWorkload(
      hostEndpoint(a),
      'locker',
      [
        'python3',
        '-c',
        `import fcntl,time; f=open(${JSON.stringify(lockFile)}, "w"); fcntl.flock(f, fcntl.LOCK_EX); time.sleep(600)`,
      ],
      'test',
    );
    const pid = w.pid ?? 0;
    await sleep(300);
    const { code, stderr } = await migrateCli('locker', breaksImages.host);
    expect(code, stderr).toBe(1);
    expect(stderr).toMatch(/CRIU DUMP failed: .*file locks/i);
    expect(stderr).toMatch(/The process still runs on a, unchanged/);
    expect(stderr).toMatch(/CRIU's logs of this step are kept in /);
    expect(isRunning(pid)).toBe(true);
    expect(readdirSync(breaksImages.imagesDir)).toEqual([]);
    process.kill(pid, 'SIGKILL');
  });
});
