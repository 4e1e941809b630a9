/**
 * The test hooks that the harness (test/harness/ferry.ts) gives the agent
 * and the controller, configured from the environment of the process the
 * test starts:
 *
 * FERRY_TEST_PAUSE_DIR=DIR: a party that reaches the point named in
 * DIR/armed disarms it, writes DIR/POINT and waits (up to a minute) until
 * the test removes that file. Meanwhile the test can do anything to any
 * party (kill it, cut its network), so every failure can strike at every
 * point.
 *
 * FERRY_TEST_FAULT="point=action[,point=action]": the agent misbehaves at
 * a named point, so that tests can prove the rollback paths with real CRIU:
 *   destination.images-done=corrupt          flip a byte of a received image before its checksum is checked
 *   destination.before-restore=break-images  delete pstree.img so that CRIU's restore fails
 *   destination.page-server=fill-images      fill the (small) images file system before the page server starts
 *   source.frozen=kill-criu-worker           kill the CRIU worker while it dumps
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readlinkSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FaultContexts, FaultPoint, PausePoint, TestHooks } from '../../src/hooks.js';
import { log } from '../../src/log.js';

type Faults = { [P in FaultPoint]: Record<string, (context: FaultContexts[P]) => void> };

const FAULTS: Faults = {
  'destination.images-done': {
    corrupt: ({ roundDir, files }) => {
      const victim = files.find((f) => f.size > 0)?.name;
      if (victim === undefined) return;
      const file = join(roundDir, victim);
      const bytes = readFileSync(file);
      bytes[0] = (bytes[0] ?? 0) ^ 0xff;
      writeFileSync(file, bytes);
    },
  },
  'destination.before-restore': {
    'break-images': ({ roundDir }) => rmSync(join(roundDir, 'pstree.img'), { force: true }),
  },
  'destination.page-server': {
    // Leave 16 KiB free where the page server will write. Only on a small
    // file system (the test mounts one): filling a RAM-backed tmpfs of the
    // machine's size would starve the machine instead.
    'fill-images': ({ imagesRoot }) => {
      const s = statfsSync(imagesRoot);
      const free = s.bavail * s.bsize;
      if (free > 1024 * 1024 * 1024) throw new Error(`refusing to fill ${imagesRoot}: ${free} bytes free`);
      execFileSync('fallocate', ['-l', String(Math.max(0, free - 16 * 1024)), join(imagesRoot, 'ballast')]);
    },
  },
  'source.frozen': {
    // The CRIU worker doing this agent's dump, which works in the dump's images directory: a swrk
    // worker of the agent's own (a dump that moves pages), or a child of the service master
    // (post-copy's lazy dump).
    'kill-criu-worker': ({ criuServicePid, imagesDir }) => {
      const childrenOf = (pid: number): number[] =>
        readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
      const candidates = [
        ...childrenOf(process.pid),
        ...(criuServicePid === undefined ? [] : childrenOf(criuServicePid)),
      ];
      for (const pid of candidates) {
        try {
          if (readlinkSync(`/proc/${pid}/cwd`) === imagesDir) process.kill(pid, 'SIGKILL');
        } catch {
          // gone meanwhile
        }
      }
    },
  },
};

export function hooksFromEnvironment(env: NodeJS.ProcessEnv = process.env): TestHooks {
  const pauseDir = env.FERRY_TEST_PAUSE_DIR ?? '';
  const armed = new Map(
    (env.FERRY_TEST_FAULT ?? '')
      .split(',')
      .map((item) => item.split('=') as [string, string | undefined])
      .filter(([point, action]) => point !== '' && action !== undefined) as [string, string][],
  );
  for (const [point, action] of armed) {
    if ((FAULTS as Record<string, Record<string, unknown> | undefined>)[point]?.[action] === undefined) {
      throw new Error(`FERRY_TEST_FAULT: no fault ${action} at ${point}`);
    }
  }
  if (armed.size > 0) log.warn('test faults armed', Object.fromEntries(armed));
  return {
    async pause(point: PausePoint): Promise<void> {
      if (pauseDir === '') return;
      const file = join(pauseDir, 'armed');
      if (!existsSync(file) || readFileSync(file, 'utf8').trim() !== point) return;
      rmSync(file, { force: true });
      const marker = join(pauseDir, point);
      writeFileSync(marker, String(process.pid));
      log.warn('paused at a test point', { point });
      const deadline = Date.now() + 60_000;
      while (existsSync(marker) && Date.now() < deadline) await sleep(20);
    },
    fault<P extends FaultPoint>(point: P, context: FaultContexts[P]): void {
      const action = armed.get(point);
      if (action === undefined) return;
      log.warn('injecting a test fault', { point, action });
      (FAULTS[point][action] as (c: FaultContexts[P]) => void)(context);
    },
  };
}
