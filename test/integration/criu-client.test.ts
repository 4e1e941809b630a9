import { execFile } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AbortedError } from '../../src/errors.js';
import {
  CriuOperationError,
  CriuService,
  CriuServiceUnavailableError,
  CriuUnsupportedError,
  ImagesDirError,
  ProcessNotFoundError,
  readDumpStats,
  readRestoreStats,
  mainReason,
  type CriuClient,
  type NotifyEvent,
} from '../../src/criu/index.js';
import { requireRoot } from '../helpers/root.js';
import { sleep, waitFor } from '../helpers/wait.js';
import { Counter, isRunning, processState } from '../helpers/workload.js';

const execFileAsync = promisify(execFile);

let service: CriuService;
let client: CriuClient;
const scratch = mkdtempSync(join(tmpdir(), 'ferry-criu-it-'));
const cleanups: (() => void)[] = [];

beforeAll(async () => {
  requireRoot();
  service = await CriuService.start();
  client = service.client();
});

afterAll(async () => {
  for (const cleanup of cleanups.reverse()) cleanup();
  await service?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

function imagesDir(name: string): string {
  const dir = join(scratch, name);
  rmSync(dir, { recursive: true, force: true });
  return mkdtempSync(dir + '-');
}

async function startCounter(options?: Parameters<typeof Counter.start>[0]): Promise<Counter> {
  const counter = await Counter.start(options);
  const restored: number[] = [];
  cleanups.push(() => counter.cleanup(restored));
  return counter;
}

/** Waits until the count has moved past `count`: the process runs. */
async function countsPast(counter: Counter, count: number): Promise<void> {
  await waitFor(() => (counter.read()?.count ?? 0) > count, { what: `the count to pass ${count}` });
}

describe('dump and restore through the RPC client', () => {
  it('restores a dumped process that continues counting from where it was, with the same PID', async () => {
    const counter = await startCounter();
    const dir = imagesDir('dump-restore');
    await client.dump({ pid: counter.pid, imagesDir: dir });
    await counter.exited;
    const frozen = counter.read();
    expect(frozen?.pid).toBe(counter.pid);
    expect(isRunning(counter.pid)).toBe(false);

    const stats = await readDumpStats(dir);
    expect(stats.pagesWritten).toBeGreaterThan(0);
    expect(stats.frozenTimeUs).toBeGreaterThan(0);

    const { pid } = await client.restore({ imagesDir: dir });
    expect(pid).toBe(counter.pid);
    const restoreStats = await readRestoreStats(dir);
    expect(restoreStats.pagesRestored).toBeGreaterThan(0);
    expect(restoreStats.restoreTimeUs).toBeGreaterThan(0);
    await countsPast(counter, frozen?.count ?? 0);
    const after = counter.read();
    expect(after?.pid).toBe(counter.pid);
    // It continued from the frozen count: no restart from 1.
    expect(after?.count).toBeGreaterThan(frozen?.count ?? Infinity);
    expect(after?.count).toBeLessThan((frozen?.count ?? 0) + 500);
  });

  it('sends a dump to an autobound page server: pages land there, the other images here, and the union restores', async () => {
    const counter = await startCounter({ memoryMb: 32, hotMb: 1 });
    const destination = imagesDir('ps-destination');
    const source = imagesDir('ps-source');
    const { port } = await client.pageServer({ imagesDir: destination, address: '127.0.0.1' });
    expect(port).toBeGreaterThan(0);
    expect(listeningTcpPorts()).toContain(port);

    await client.dump({ pid: counter.pid, imagesDir: source, pageServer: { address: '127.0.0.1', port } });
    await counter.exited;
    const frozen = counter.count();

    const destFiles = readdirSync(destination);
    const sourceFiles = readdirSync(source);
    expect(destFiles.some((f) => /^pages-\d+\.img$/.test(f))).toBe(true);
    expect(destFiles.some((f) => /^pagemap-\d+\.img$/.test(f))).toBe(true);
    expect(sourceFiles.some((f) => /^pages-\d+\.img$/.test(f))).toBe(false);
    expect(sourceFiles).toContain('pstree.img');
    expect(sourceFiles.some((f) => /^core-\d+\.img$/.test(f))).toBe(true);
    expect(destFiles).not.toContain('pstree.img');

    for (const file of sourceFiles) {
      if (!destFiles.includes(file)) copyFileSync(join(source, file), join(destination, file));
    }
    const { pid } = await client.restore({ imagesDir: destination });
    expect(pid).toBe(counter.pid);
    await countsPast(counter, frozen);
  });

  it('restores a process left stopped, which runs only when continued', async () => {
    const counter = await startCounter();
    const dir = imagesDir('leave-stopped');
    await client.dump({ pid: counter.pid, imagesDir: dir });
    await counter.exited;
    const frozen = counter.count();
    const { pid } = await client.restore({ imagesDir: dir, leaveStopped: true });
    await waitFor(() => processState(pid) === 'T', { what: 'the restored process to be stopped' });
    await sleep(200);
    expect(counter.count()).toBe(frozen);
    process.kill(pid, 'SIGCONT');
    await countsPast(counter, frozen);
  });
});

describe('NOTIFY', () => {
  it('reports the notification sequence of a dump and of a restore', async () => {
    const counter = await startCounter();
    const dir = imagesDir('notify');
    const dumpEvents: string[] = [];
    await client.dump({
      pid: counter.pid,
      imagesDir: dir,
      onNotify: (e) => {
        dumpEvents.push(e.script);
        return true;
      },
    });
    await counter.exited;
    expect(dumpEvents).toEqual(['pre-dump', 'query-ext-files', 'post-dump']);

    const restoreEvents: Pick<NotifyEvent, 'script' | 'pid'>[] = [];
    const { pid } = await client.restore({
      imagesDir: dir,
      onNotify: (e) => {
        restoreEvents.push({ script: e.script, pid: e.pid });
        return true;
      },
    });
    expect(restoreEvents.map((e) => e.script)).toEqual(['pre-restore', 'post-restore', 'pre-resume', 'post-resume']);
    expect(restoreEvents.find((e) => e.script === 'post-restore')?.pid).toBe(pid);
  });

  it('keeps the process frozen while post-dump is held, and resumes it when the answer is no', async () => {
    const counter = await startCounter();
    const dir = imagesDir('hold');
    let release: ((go: boolean) => void) | undefined;
    const dump = client.dump({
      pid: counter.pid,
      imagesDir: dir,
      onNotify: (e) => (e.script === 'post-dump' ? new Promise<boolean>((resolve) => (release = resolve)) : true),
    });
    await waitFor(() => release !== undefined, { what: 'the post-dump notification' });
    const held = counter.count();
    await sleep(500); // 25 ticks of the counter
    expect(counter.count()).toBe(held);
    expect(isRunning(counter.pid)).toBe(true);

    release?.(false);
    const error = await dump.catch((e: unknown) => e);
    expect(error).toBeInstanceOf(CriuOperationError);
    await countsPast(counter, held);
    expect(counter.read()?.pid).toBe(counter.pid);
  });

  it('resumes the process when the client cancels during a held post-dump', async () => {
    const counter = await startCounter();
    const controller = new AbortController();
    const dump = client.dump({
      pid: counter.pid,
      imagesDir: imagesDir('cancel-held'),
      signal: controller.signal,
      onNotify: (e) => {
        if (e.script === 'post-dump') setTimeout(() => controller.abort(), 100);
        return e.script === 'post-dump' ? new Promise<boolean>(() => undefined) : true;
      },
    });
    await expect(dump).rejects.toBeInstanceOf(AbortedError);
    const count = counter.count();
    await countsPast(counter, count);
    expect(isRunning(counter.pid)).toBe(true);
  });

  it('resumes the process when the client cancels while CRIU is still dumping memory', async () => {
    const counter = await startCounter({ memoryMb: 256, hotMb: 1 });
    const controller = new AbortController();
    const dir = imagesDir('cancel-early');
    setTimeout(() => controller.abort(), 50);
    await expect(client.dump({ pid: counter.pid, imagesDir: dir, signal: controller.signal })).rejects.toBeInstanceOf(
      AbortedError,
    );
    // CRIU finishes its memory dump, finds the client gone at post-dump and thaws the tree.
    await waitFor(() => readFileSync(join(dir, 'dump.log'), 'utf8').includes('Dumping FAILED'), {
      what: 'CRIU to give up the dump',
      timeoutMs: 30_000,
    });
    const count = counter.count();
    await countsPast(counter, count);
    expect(isRunning(counter.pid)).toBe(true);
  });
});

describe('cancelling a restore', () => {
  it('leaves no copy running when cancelled while held at post-restore', async () => {
    const counter = await startCounter();
    const dir = imagesDir('cancel-restore');
    await client.dump({ pid: counter.pid, imagesDir: dir });
    await counter.exited;
    const frozen = counter.count();
    const controller = new AbortController();
    const restore = client.restore({
      imagesDir: dir,
      signal: controller.signal,
      onNotify: (e) => {
        if (e.script !== 'post-restore') return true;
        setTimeout(() => controller.abort(), 100);
        return new Promise<boolean>(() => undefined);
      },
    });
    await expect(restore).rejects.toBeInstanceOf(AbortedError);
    await waitFor(() => readFileSync(join(dir, 'restore.log'), 'utf8').includes('Restoring FAILED'), {
      what: 'CRIU to give up the restore',
    });
    await waitFor(() => !isRunning(counter.pid), { what: 'the half-restored copy to be killed' });
    await sleep(300);
    expect(counter.count()).toBe(frozen);
  });
});

describe('kernel features', () => {
  it('reports memory tracking as CRIU itself detects it, and refuses PRE_DUMP clearly where it is missing', async () => {
    const features = await client.featureCheck();
    const cli = await execFileAsync(service.binary.path, ['check', '--feature', 'mem_dirty_track']).then(
      () => true,
      () => false,
    );
    expect(features.memTrack).toBe(cli);
    expect(features.lazyPages).toBe(true);

    const counter = await startCounter();
    const preDump = client.preDump({ pid: counter.pid, imagesDir: imagesDir('pre-dump') });
    if (features.memTrack) {
      await expect(preDump).resolves.toBeUndefined();
    } else {
      await expect(preDump).rejects.toBeInstanceOf(CriuUnsupportedError);
    }
    // Either way the process runs on.
    await countsPast(counter, counter.count());
  });

  it('dumps and checks the CPU description', async () => {
    const dir = imagesDir('cpuinfo');
    await client.cpuinfoDump({ imagesDir: dir });
    expect(existsSync(join(dir, 'cpuinfo.img'))).toBe(true);
    await client.cpuinfoCheck({ imagesDir: dir });

    writeFileSync(join(dir, 'cpuinfo.img'), Buffer.alloc(16));
    await expect(client.cpuinfoCheck({ imagesDir: dir })).rejects.toBeInstanceOf(CriuOperationError);
  });

  it('passes CRIU’s own check', async () => {
    await expect(client.check()).resolves.toBeUndefined();
  });
});

describe('bad input', () => {
  it('rejects a PID that does not exist, and the next call works', async () => {
    const error = (await client
      .dump({ pid: 4_000_000, imagesDir: imagesDir('no-pid') })
      .catch((e: unknown) => e)) as ProcessNotFoundError;
    expect(error).toBeInstanceOf(ProcessNotFoundError);
    expect(error.message).toBe('no process with PID 4000000');
    expect((await client.version()).major).toBe(4);
  });

  it('rejects an images directory that does not exist, and the next call works', async () => {
    const error = (await client
      .restore({ imagesDir: join(scratch, 'does-not-exist') })
      .catch((e: unknown) => e)) as ImagesDirError;
    expect(error).toBeInstanceOf(ImagesDirError);
    expect(error.hint).toBe('the directory does not exist: create it first');
    expect((await client.version()).major).toBe(4);
  });

  it('reports a failed restore with the reason from CRIU’s log, not the harmless rlimit line', async () => {
    const dir = imagesDir('empty');
    const error = (await client.restore({ imagesDir: dir }).catch((e: unknown) => e)) as CriuOperationError;
    expect(error).toBeInstanceOf(CriuOperationError);
    expect(error.request).toBe('RESTORE');
    expect(error.logFile).toBe(join(dir, 'restore.log'));
    expect(error.logTail.length).toBeGreaterThan(0);
    expect(error.logErrors.length).toBeGreaterThan(0);
    expect(error.logErrors.join('\n')).not.toMatch(/RLIMIT_NOFILE/);
    expect(error.message).toContain(mainReason(error.logErrors));
    expect((await client.version()).major).toBe(4);
  });

  it('reports a CRIU binary that is missing as a typed error', async () => {
    const error = (await CriuService.start({ binary: { path: join(scratch, 'no-criu'), source: 'setting' } }).catch(
      (e: unknown) => e,
    )) as CriuServiceUnavailableError;
    expect(error).toBeInstanceOf(CriuServiceUnavailableError);
    expect(error.message).toMatch(/no-criu/);
    expect(error.hint).toMatch(/CRIU/);
  });

  it('restarts a criu service that died between calls, and the next call works', async () => {
    const before = service.restarts;
    const oldPid = service.pid;
    expect(oldPid).toBeDefined();
    process.kill(oldPid as number, 'SIGKILL');
    await waitFor(() => !isRunning(oldPid as number), { what: 'the service to die' });
    expect((await client.version()).major).toBe(4);
    expect(service.restarts).toBe(before + 1);
    expect(service.pid).not.toBe(oldPid);
    expect(service.state).toBe('running');
  });
});

describe('supervision', () => {
  it('restarts a service that is alive but stopped answering', async () => {
    const watched = await CriuService.start({ healthCheckIntervalMs: 200, healthCheckTimeoutMs: 500 });
    try {
      const hung = watched.pid as number;
      process.kill(hung, 'SIGSTOP');
      await waitFor(() => watched.restarts === 1 && watched.state === 'running', {
        what: 'the health check to restart the hung service',
      });
      expect(watched.pid).not.toBe(hung);
      expect((await watched.client().version()).major).toBe(4);
    } finally {
      await watched.stop();
    }
  });
});

describe('endurance', () => {
  it('answers 1,000 consecutive calls without growing file descriptors or memory', async () => {
    const warmup = 50;
    for (let i = 0; i < warmup; i++) await client.version();
    gc();
    const fdsBefore = readdirSync('/proc/self/fd').length;
    const rssBefore = process.memoryUsage().rss;
    const heapBefore = process.memoryUsage().heapUsed;
    const spent = { version: 0, features: 0 };
    for (let i = 0; i < 1000; i++) {
      const started = performance.now();
      if (i % 2 === 0) {
        await client.version();
        spent.version += performance.now() - started;
      } else {
        await client.featureCheck({ refresh: true });
        spent.features += performance.now() - started;
      }
    }
    gc();
    const fdsAfter = readdirSync('/proc/self/fd').length;
    const rssAfter = process.memoryUsage().rss;
    const heapAfter = process.memoryUsage().heapUsed;
    const mb = (n: number): string => (n / 1024 / 1024).toFixed(1);
    console.log(
      `1,000 RPC calls: VERSION ${(spent.version / 500).toFixed(2)} ms, FEATURE_CHECK ${(spent.features / 500).toFixed(2)} ms ` +
        `per call; fds ${fdsBefore} -> ${fdsAfter}; ` +
        `rss ${mb(rssBefore)} -> ${mb(rssAfter)} MB; heap ${mb(heapBefore)} -> ${mb(heapAfter)} MB`,
    );
    expect(fdsAfter - fdsBefore).toBeLessThanOrEqual(2);
    expect(rssAfter - rssBefore).toBeLessThan(32 * 1024 * 1024);
    expect(heapAfter - heapBefore).toBeLessThan(8 * 1024 * 1024);
    expect(service.restarts).toBeLessThanOrEqual(1); // the one deliberate kill above
  });
});

/** TCP ports in LISTEN state on this machine, from /proc/net/tcp and tcp6. */
function listeningTcpPorts(): number[] {
  const ports: number[] = [];
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    if (!existsSync(file)) continue;
    for (const line of readFileSync(file, 'utf8').split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields[3] === '0A') ports.push(parseInt(fields[1]?.split(':')[1] ?? '0', 16));
    }
  }
  return ports;
}

declare function gc(): void;
