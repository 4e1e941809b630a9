/**
 * What CRIU's lazy pages (post-copy) need from this kernel beyond
 * userfaultfd, which FEATURE_CHECK reports. docs/postcopy.md has the
 * evidence.
 */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { logReason } from './errors.js';

/**
 * CRIU 4.1's lazy page server tees every requested page through a pipe it
 * sizes to PIPE_MAX_SIZE pages (8 pages of 40-byte pipe buffers: 819
 * pages); the kernel rounds that to a power of two, 4 MiB. Above
 * fs.pipe-max-size that takes CAP_SYS_RESOURCE. When it is refused, CRIU
 * ignores the failure and later splices into fd -1: "page-pipe: splice: -1:
 * Bad file descriptor" at the first page request.
 */
export const LAZY_PIPE_BYTES = 4 * 1024 * 1024;

const CAP_SYS_RESOURCE = 24;

export interface LazyPipeLimits {
  /** fs.pipe-max-size, in bytes. */
  pipeMaxSize: number;
  /** Whether processes this one starts (CRIU's service) may exceed it. */
  capSysResource: boolean;
  neededBytes: number;
  ok: boolean;
}

export function lazyPipeLimits(): LazyPipeLimits {
  const pipeMaxSize = Number(readFileSync('/proc/sys/fs/pipe-max-size', 'utf8').trim());
  const effective = /^CapEff:\s*([0-9a-f]+)/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0';
  const capSysResource = ((BigInt(`0x${effective}`) >> BigInt(CAP_SYS_RESOURCE)) & 1n) === 1n;
  return {
    pipeMaxSize,
    capSysResource,
    neededBytes: LAZY_PIPE_BYTES,
    ok: capSysResource || pipeMaxSize >= LAZY_PIPE_BYTES,
  };
}

export interface LazyPagesDaemonOptions {
  binary: string;
  /** The restore's images directory: the daemon and the restore meet on a socket there. */
  imagesDir: string;
  /** The source's lazy page server. */
  address: string;
  port: number;
  tls?: { cacert: string; cert: string; key: string } | undefined;
  logFile?: string | undefined;
}

export interface LazyPagesDaemon {
  readonly pid: number;
  /** Resolves when the daemon ends: code 0 once every page has arrived. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Resolves when the daemon listens for the restore; rejects if it ends first. */
  readonly ready: Promise<void>;
  kill(): void;
}

/** The socket `criu lazy-pages` listens on, in its working (images) directory. */
export const LAZY_PAGES_SOCKET = 'lazy-pages.socket';

/**
 * Starts `criu lazy-pages --page-server`: the destination's half of
 * post-copy, which CRIU's RPC does not offer. It takes the restored
 * process's userfaultfds from the restore and fetches its memory from the
 * source, on demand and in the background, then exits. It runs in its own
 * session, so that it outlives an agent restart: the process needs it.
 */
export function startLazyPagesDaemon(options: LazyPagesDaemonOptions): LazyPagesDaemon {
  const args = [
    'lazy-pages',
    '--page-server',
    '--address',
    options.address,
    '--port',
    String(options.port),
    '-D',
    options.imagesDir,
    '-o',
    options.logFile ?? 'lazy-pages.log',
    '-v4',
  ];
  if (options.tls !== undefined) {
    args.push(
      '--tls',
      '--tls-cacert',
      options.tls.cacert,
      '--tls-cert',
      options.tls.cert,
      '--tls-key',
      options.tls.key,
    );
  }
  const child = spawn(options.binary, args, { stdio: 'ignore', detached: true, cwd: options.imagesDir });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('error', () => resolve({ code: -1, signal: null }));
    child.once('exit', (code, signal) => resolve({ code, signal }));
  });
  const socket = join(options.imagesDir, LAZY_PAGES_SOCKET);
  const ready = (async () => {
    const deadline = Date.now() + 10_000;
    let ended = false;
    void exited.then(() => (ended = true));
    while (!existsSync(socket)) {
      if (ended) {
        const reason = await logReason(join(options.imagesDir, options.logFile ?? 'lazy-pages.log'));
        throw new Error(`criu lazy-pages ended before it listened: ${reason ?? 'no error in its log'}`);
      }
      if (Date.now() > deadline) throw new Error('criu lazy-pages did not listen within 10 s');
      await sleep(10);
    }
  })();
  ready.catch(() => undefined);
  return {
    pid: child.pid ?? 0,
    exited,
    ready,
    kill: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    },
  };
}

/** The port CRIU autobound for a lazy dump's page server, from its log ("Using N port"). */
export function lazyPortFromLog(logPath: string): number | undefined {
  if (!existsSync(logPath)) return undefined;
  const match = /Using (\d+) port/.exec(readFileSync(logPath, 'utf8'));
  return match === null ? undefined : Number(match[1]);
}

/** Pages a lazy-pages daemon copied in, summed over the processes of its log ("UFFD transferred pages: (N/M)"). */
export function lazyPagesCopied(logPath: string): number {
  if (!existsSync(logPath)) return 0;
  let total = 0;
  for (const match of readFileSync(logPath, 'utf8').matchAll(/UFFD transferred pages: \((\d+)\/\d+\)/g)) {
    total += Number(match[1]);
  }
  return total;
}
