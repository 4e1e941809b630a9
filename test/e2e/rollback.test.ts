import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FERRY_BIN } from '../helpers/cli.js';
import { hostEndpoint, labDown, labUp, restartAgent, type LabHost } from '../helpers/lab.js';
import { projectRoot } from '../../src/paths.js';
import { runWorkload } from '../../controller/agents/index.js';
import { counterOn, homeFile, homeIn, killOn, onHost, runsOn, workloadPidsOn } from '../helpers/hosts.js';
import { requireRoot } from '../helpers/root.js';
import { sleep, waitFor } from '../helpers/wait.js';

const execFileAsync = promisify(execFile);
const LAB = `fr${process.pid % 100_000}`;
const examples = join(projectRoot(), 'dist', 'examples');
const ferry = FERRY_BIN;
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
});

/** The counter's state on the source, in its own directory there. */
function count(name: string): { pid: number; count: number } {
  const state = counterOn(a, name);
  return { pid: state?.pid ?? 0, count: state?.count ?? 0 };
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
      const name = `victim-${host().host}`;
      // Its state file is in its own directory (its working directory), which a migration carries.
      const w = await runWorkload(hostEndpoint(a), name, [join(examples, 'counter'), 'state', '20', '16', '1'], 'test');
      const pid = w.pid ?? 0;
      await sleep(200);

      const { code, stderr } = await migrateCli(name, host().host);
      expect(code, stderr).toBe(1);
      expect(stderr).toMatch(/The process still runs on a, unchanged/);

      // Same process, still counting, from where it was (no restart from 1).
      expect(runsOn(a, pid)).toBe(true);
      const after = count(name);
      expect(after.pid).toBe(1); // PID 1 inside its own namespace, as before
      await waitFor(() => count(name).count > after.count, { what: 'the source to keep counting' });
      // The destination kept nothing: no images, no restored copy, none of the files the workload carries.
      expect(readdirSync(onHost(host(), host().imagesDir))).toEqual([]);
      expect(workloadPidsOn(host())).toEqual([]);
      expect(existsSync(onHost(host(), homeIn(host(), name)))).toBe(false);
      expect(existsSync(homeFile(a, name, 'state'))).toBe(true);
      await killOn(a, pid);
    });
  }
});

describe('a migration that fails on the source', () => {
  it('keeps a process whose dump fails after the freeze running, and says why', async () => {
    // What preflight cannot see: the CRIU worker dies while it dumps (a crash, the OOM killer).
    a = await restartAgent(LAB, 'a', { FERRY_TEST_FAULT: 'source.frozen=kill-criu-worker' });
    try {
      const w = await runWorkload(hostEndpoint(a), 'dumpfails', [join(examples, 'counter'), 'state'], 'test');
      const pid = w.pid ?? 0;
      await waitFor(() => count('dumpfails').count > 2, { what: 'the workload to count on a' });
      const { code, stderr } = await migrateCli('dumpfails', breaksImages.host);
      expect(code, stderr).toBe(1);
      expect(stderr).toMatch(/migration failed during switchover: a: /);
      expect(stderr).toMatch(/The process still runs on a, unchanged/);
      expect(stderr).toMatch(/CRIU's logs of this step are kept in /);
      // On a, where the dump ran: an operator there reads them.
      const kept = /CRIU's logs of this step are kept in (\S+?)[;.]?$/m.exec(stderr)?.[1] ?? '';
      const logs = readdirSync(onHost(a, kept), { recursive: true }).map(String);
      expect(
        logs.some((f) => f.endsWith('.log')),
        `${kept} on a: ${logs.join(' ')}`,
      ).toBe(true);
      expect(runsOn(a, pid)).toBe(true);
      const after = count('dumpfails').count;
      await waitFor(() => count('dumpfails').count > after, { what: 'the workload to go on counting on a' });
      expect(readdirSync(onHost(breaksImages, breaksImages.imagesDir))).toEqual([]);
      expect(existsSync(onHost(breaksImages, homeIn(breaksImages, 'dumpfails')))).toBe(false);
      await killOn(a, pid);
    } finally {
      a = await restartAgent(LAB, 'a');
    }
  });
});
