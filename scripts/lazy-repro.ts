/**
 * The smallest lazy (post-copy) migration, with CRIU's command line only: no
 * Ferry agent, no RPC, no TLS, one machine. A counter in its own PID
 * namespace is dumped with --lazy-pages (the dump then serves its memory on a
 * TCP port), a `criu lazy-pages` daemon fetches from it, and `criu restore
 * --lazy-pages` starts the copy before its memory has arrived. It prints what
 * decides the outcome on this kernel and CRIU's error lines; docs/postcopy.md
 * explains them.
 *
 * usage: node dist/scripts/lazy-repro.js [--pipe-max-size BYTES] [--memory MiB]
 *   --pipe-max-size  set fs.pipe-max-size for the run (restored afterwards)
 * Exit code 0 when the restored copy runs on with its memory intact.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { resolveCriuBinary } from '../src/criu/binary.js';
import { lazyPipeLimits } from '../src/criu/index.js';
import { readCounterState } from '../src/counter.js';
import { projectRoot } from '../src/paths.js';
import { waitFor } from '../src/wait.js';

const args = process.argv.slice(2);
const option = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const memoryMb = Number(option('--memory') ?? 64);
const pipeMaxSize = option('--pipe-max-size');
const PIPE_MAX_SIZE_FILE = '/proc/sys/fs/pipe-max-size';

const criu = resolveCriuBinary().path;
const dir = mkdtempSync(join(tmpdir(), 'ferry-lazy-repro-'));
const images = join(dir, 'images');
mkdirSync(images);
const original = readFileSync(PIPE_MAX_SIZE_FILE, 'utf8').trim();
if (pipeMaxSize !== undefined) writeFileSync(PIPE_MAX_SIZE_FILE, pipeMaxSize);

const say = (line: string): void => console.log(line);
const count = (state: string): number => readCounterState(state)?.count ?? 0;
const waitUntil = (check: () => boolean, what: string): Promise<void> =>
  waitFor(check, { what, timeoutMs: 15_000, intervalMs: 50 });
let ok = false;
try {
  const limits = lazyPipeLimits();
  say(`kernel ${readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim()}, CRIU ${version()}`);
  say(
    `fs.pipe-max-size ${limits.pipeMaxSize}, CAP_SYS_RESOURCE ${limits.capSysResource ? 'yes' : 'no'}; ` +
      `CRIU's lazy page server asks for ${limits.neededBytes}-byte pipes: ${limits.ok ? 'allowed' : 'refused'}`,
  );

  // The counter (examples/counter.c) in its own PID namespace, so that its restored copy keeps its PIDs.
  const state = join(dir, 'state');
  const counter = join(projectRoot(), 'dist', 'examples', 'counter');
  const worker = spawn('unshare', ['-p', '-f', 'setsid', counter, state, '20', String(memoryMb), '1', '0', '10'], {
    detached: true,
    stdio: 'ignore',
  });
  await waitUntil(() => count(state) > 2, 'the counter to start');
  const pid = Number(readFileSync(`/proc/${worker.pid}/task/${worker.pid}/children`, 'utf8').trim());
  say(`counter: PID ${pid}, ${memoryMb} MiB, count ${count(state)}`);

  const port = await freePort();
  const dump = spawn(
    criu,
    ['dump', '-t', String(pid), '-D', images, '--lazy-pages', '--port', String(port), '-v4', '-o', 'dump.log'],
    {
      stdio: 'ignore',
    },
  );
  const dumpExit = exitOf(dump);
  await waitUntil(
    () => logHas(join(images, 'dump.log'), 'Starting page server') || dump.exitCode !== null,
    'the lazy dump',
  );
  say(`criu dump --lazy-pages: serving on port ${port}`);
  const lazy = spawn(
    criu,
    [
      'lazy-pages',
      '--page-server',
      '--address',
      '127.0.0.1',
      '--port',
      String(port),
      '-D',
      images,
      '-v4',
      '-o',
      'lazy.log',
    ],
    {
      stdio: 'ignore',
    },
  );
  const lazyExit = exitOf(lazy);
  await waitUntil(
    () => existsSync(join(images, 'lazy-pages.socket')) || lazy.exitCode !== null,
    'the lazy-pages daemon',
  );
  const restore = spawnSync(criu, ['restore', '-D', images, '--lazy-pages', '-d', '-v4', '-o', 'restore.log']);
  say(`criu restore --lazy-pages: exit ${restore.status}`);
  const [lazyCode, dumpCode] = await Promise.all([lazyExit, dumpExit]);
  say(`criu lazy-pages: exit ${lazyCode}; criu dump: exit ${dumpCode}`);
  const before = count(state);
  await sleep(500);
  const after = count(state);
  const corrupt = readCounterState(state)?.corrupt === true;
  ok = restore.status === 0 && lazyCode === 0 && dumpCode === 0 && after > before && !corrupt;
  say(`counter after restore: ${before} → ${after}${corrupt ? ', memory CORRUPT' : ''}`);
  for (const log of ['dump.log', 'lazy.log', 'restore.log']) {
    const errors = readFileSync(join(images, log), 'utf8')
      .split('\n')
      .filter((l) => /Error|splice|tee pipe|FAILED/.test(l) && !l.includes('RLIMIT_NOFILE'));
    for (const line of errors.slice(0, 6)) say(`  ${log}: ${line}`);
  }
  say(ok ? 'lazy migration: works' : 'lazy migration: FAILED');
  say(`logs: ${images}`);
  spawnSync('pkill', ['-KILL', '-f', state]);
} finally {
  if (pipeMaxSize !== undefined) writeFileSync(PIPE_MAX_SIZE_FILE, original);
}
process.exit(ok ? 0 : 1);

function version(): string {
  return /Version: (\S+)/.exec(spawnSync(criu, ['--version'], { encoding: 'utf8' }).stdout)?.[1] ?? '?';
}

function logHas(file: string, text: string): boolean {
  return existsSync(file) && readFileSync(file, 'utf8').includes(text);
}

function exitOf(child: ReturnType<typeof spawn>): Promise<number | null> {
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => resolve(typeof address === 'object' && address !== null ? address.port : 0));
    });
  });
}
