/**
 * The post-copy probe: whether this node can take either side of a lazy
 * migration, shown by doing one. A small counter in its own PID namespace
 * is dumped with lazy pages through this agent's CRIU service, fetched by a
 * `criu lazy-pages` daemon over this node's address (with the agent's TLS
 * identity when it has one), restored lazily, and must count on with its
 * memory intact. FEATURE_CHECK's lazy_pages only says userfaultfd exists;
 * on the project's machines that is true and a lazy migration still fails
 * (docs/postcopy.md).
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import {
  lazyPipeLimits,
  logReason,
  lazyPortFromLog,
  startLazyPagesDaemon,
  LAZY_PIPE_BYTES,
  type CriuClient,
  type PageTls,
} from '../src/criu/index.js';
import { readCounterState } from '../src/counter.js';
import { deferred } from '../src/deferred.js';
import { projectRoot } from '../src/paths.js';
import { waitFor } from '../src/wait.js';

export interface PostcopySupport {
  works: boolean;
  reason: string;
  hint: string;
  probeMs: number;
  probedAtMs: number;
}

export interface ProbeContext {
  criu: Pick<CriuClient, 'featureCheck' | 'dump' | 'restore'>;
  criuBinary: string;
  /** A directory the probe may use (and empties after itself). */
  scratchRoot: string;
  /** The address the node's page servers use. */
  address: string;
  tls: PageTls | undefined;
  nodeName: string;
}

const PROBE_TIMEOUT_MS = 60_000;

export async function probePostcopy(context: ProbeContext): Promise<PostcopySupport> {
  const started = Date.now();
  const result = (works: boolean, reason: string, hint = ''): PostcopySupport => ({
    works,
    reason,
    hint,
    probeMs: Date.now() - started,
    probedAtMs: Date.now(),
  });
  const features = await context.criu.featureCheck();
  if (!features.lazyPages) {
    return result(
      false,
      `${context.nodeName}'s kernel has no non-cooperative userfaultfd, which CRIU's lazy pages need`,
      'post-copy needs Linux 4.11 or later with CONFIG_USERFAULTFD; use --strategy stop-and-copy',
    );
  }
  const dir = mkdtempSync(join(context.scratchRoot, 'postcopy-probe-'));
  let failure: string | undefined;
  try {
    failure = await oneLazyMigration(context, dir, started + PROBE_TIMEOUT_MS);
  } catch (error) {
    failure = (error as Error).message;
  }
  try {
    if (failure === undefined) {
      return result(true, 'a lazy dump, lazy-pages daemon and lazy restore of a test process worked here');
    }
    const limits = lazyPipeLimits();
    const splice = readLog(join(dir, 'images', 'dump.log')).includes('splice: -1: Bad file descriptor');
    if (!limits.ok && (splice || failure.includes('splice'))) {
      return result(
        false,
        `CRIU's lazy page server on ${context.nodeName} cannot size its pipe: it needs ${LAZY_PIPE_BYTES} bytes, ` +
          `fs.pipe-max-size is ${limits.pipeMaxSize} and CRIU lacks CAP_SYS_RESOURCE ` +
          `(CRIU then fails with "page-pipe: splice: -1: Bad file descriptor")`,
        `on ${context.nodeName}, as root: sysctl -w fs.pipe-max-size=${LAZY_PIPE_BYTES} (and in /etc/sysctl.d to keep it), ` +
          'or run the agent with CAP_SYS_RESOURCE; see docs/postcopy.md',
      );
    }
    return result(false, `a test lazy migration failed on ${context.nodeName}: ${failure}`, 'see docs/postcopy.md');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Undefined when it worked, else what failed. */
async function oneLazyMigration(context: ProbeContext, dir: string, deadline: number): Promise<string | undefined> {
  const images = join(dir, 'images');
  const state = join(dir, 'state');
  const counter = join(projectRoot(), 'dist', 'examples', 'counter');
  if (!existsSync(counter)) return `the probe's test program ${counter} is missing`;
  // 4 MiB, verified every 5 ticks: a page that came back empty shows.
  const holder = spawn('unshare', ['-p', '-f', 'setsid', counter, state, '20', '4', '0', '0', '5'], {
    detached: true,
    stdio: 'ignore',
  });
  const kill = (pid: number | undefined): void => {
    try {
      if (pid !== undefined && pid > 0) process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  };
  let restoredPid: number | undefined;
  let daemon: ReturnType<typeof startLazyPagesDaemon> | undefined;
  try {
    const count = (): number => readCounterState(state)?.count ?? 0;
    const corrupt = (): boolean => readCounterState(state)?.corrupt === true;
    const left = (): { timeoutMs: number; intervalMs: number } => ({
      timeoutMs: deadline - Date.now(),
      intervalMs: 20,
    });
    await waitFor(() => count() >= 2, { what: 'the test process to start', ...left() });
    const pid = Number(readLog(`/proc/${holder.pid}/task/${holder.pid}/children`).trim());
    if (!(pid > 0)) return 'the test process did not start';
    mkdirSync(images, { mode: 0o700 });
    let port: number | undefined;
    const serving = deferred<void>();
    const dump = context.criu
      .dump({
        pid,
        imagesDir: images,
        lazyPages: { port: 0, tls: context.tls },
        timeoutMs: PROBE_TIMEOUT_MS,
        onNotify: (event) => {
          if (event.script === 'status-ready') {
            port = lazyPortFromLog(join(images, 'dump.log'));
            serving.resolve();
          }
          return true;
        },
      })
      .then(
        () => undefined,
        async (error: unknown) =>
          `the lazy dump failed: ${(await logReason(join(images, 'dump.log'))) ?? (error as Error).message}`,
      );
    const early = await Promise.race([serving.promise.then(() => undefined), dump]);
    if (early !== undefined) return early;
    if (port === undefined) return 'CRIU did not log the lazy page server’s port';
    daemon = startLazyPagesDaemon({
      binary: context.criuBinary,
      imagesDir: images,
      address: context.address,
      port,
      tls: context.tls,
    });
    await daemon.ready;
    const restored = await context.criu
      .restore({ imagesDir: images, lazyPages: true, timeoutMs: PROBE_TIMEOUT_MS })
      .then(
        (r) => r.pid,
        async (error: unknown) =>
          `the lazy restore failed: ${(await logReason(join(images, 'restore.log'))) ?? (error as Error).message}`,
      );
    if (typeof restored === 'string') return (await dump) ?? restored;
    restoredPid = restored;
    const [exit, dumped] = await Promise.all([daemon.exited, dump]);
    if (dumped !== undefined) return dumped;
    if (exit.code !== 0) {
      return `criu lazy-pages ended with ${exit.signal ?? `exit code ${exit.code}`}: ${(await logReason(join(images, 'lazy-pages.log'))) ?? 'no error logged'}`;
    }
    const before = count();
    await waitFor(() => count() > before + 5 || corrupt(), {
      what: 'the restored test process to count on',
      ...left(),
    });
    if (corrupt()) return 'the restored test process found its memory changed';
    return undefined;
  } finally {
    daemon?.kill();
    kill(restoredPid);
    kill(holder.pid);
  }
}

function readLog(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}
