import { spawn } from 'node:child_process';
import type { Socket } from 'node:net';
import { closeSync, constants, existsSync, openSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FerryError, TimeoutError, abortReason } from '../errors.js';
import {
  CriuDisconnectedError,
  CriuOperationError,
  CriuProtocolError,
  CriuServiceUnavailableError,
  CriuUnsupportedError,
  ImagesDirError,
  ProcessNotFoundError,
} from './errors.js';
import { readLogExcerpt } from './log.js';
import {
  NetworkLockMethod,
  RequestType,
  RpcRequest,
  RpcResponse,
  has,
  requestTypeName,
  type RequestTypeValue,
  type RpcOptions as FullRpcOptions,
  type RpcRequestMessage,
  type RpcResponseMessage,
} from './rpc.js';
import { seqpacketAddon } from './native.js';
import { closeAll, SeqpacketConnection, type PacketConnection } from './transport.js';

/** Something that hands out fresh connections to a CRIU RPC service (one worker per connection). */
export interface CriuEndpoint {
  connect(options?: { signal?: AbortSignal | undefined }): Promise<PacketConnection>;
}

/** A descriptor handed to a swrk worker: a number, or a socket of this process (its descriptor is passed). */
export type PassedFd = number | Socket;

/** The first descriptor number a swrk worker sees the caller's descriptors at (0-2 stdio, 3 the RPC socket). */
export const SWRK_FIRST_FD = 4;

/**
 * `criu swrk`: a CRIU process of its own for one call, this process's
 * child, speaking the RPC on a socket pair. Unlike the service it may be
 * handed descriptors (they appear at SWRK_FIRST_FD, SWRK_FIRST_FD + 1, ...):
 * CRIU accepts ps.fd (a page stream it does not open itself) and
 * inherit_fd only from a swrk worker.
 */
export class SwrkEndpoint implements CriuEndpoint {
  constructor(
    readonly binaryPath: string,
    readonly fds: readonly PassedFd[] = [],
  ) {}

  connect(): Promise<PacketConnection> {
    const native = seqpacketAddon();
    // CRIU does blocking I/O on what it is given; a Node socket's descriptor is non-blocking.
    for (const fd of this.fds) if (typeof fd !== 'number') native.blocking(socketDescriptor(fd));
    const [ours, theirs] = native.socketpair(false);
    try {
      const child = spawn(this.binaryPath, ['swrk', '3'], {
        stdio: ['ignore', 'ignore', 'ignore', theirs, ...this.fds],
      });
      // A worker that cannot start ends the connection: the call sees CRIU disconnected.
      child.once('error', () => undefined);
      child.unref();
    } catch (cause) {
      native.close(ours);
      throw new CriuServiceUnavailableError(`cannot start ${this.binaryPath} swrk: ${(cause as Error).message}`, {
        cause,
      });
    } finally {
      native.close(theirs);
    }
    return Promise.resolve(SeqpacketConnection.fromDescriptor(ours));
  }
}

/** A `criu service` socket that someone else runs. */
export class CriuSocketEndpoint implements CriuEndpoint {
  constructor(readonly socketPath: string) {}

  connect(): Promise<PacketConnection> {
    try {
      return Promise.resolve(SeqpacketConnection.connect(this.socketPath));
    } catch (cause) {
      return Promise.reject(
        new CriuServiceUnavailableError(
          `cannot connect to the CRIU service at ${this.socketPath}: ${(cause as Error).message}`,
          {
            cause,
            hint: 'start it with `criu service --address SOCKET`, or let Ferry supervise one',
          },
        ),
      );
    }
  }
}

/** Every call can be cancelled and gives up after a timeout (0: never). */
export interface CallOptions {
  signal?: AbortSignal | undefined;
  timeoutMs?: number | undefined;
}

/**
 * A notification CRIU sends while it works (with notify_scripts). The
 * handler answers true (go on), false (CRIU aborts the step; at post-dump
 * it resumes the source), or holds its answer by returning a promise: CRIU
 * waits, and the process stays frozen, until the promise settles.
 */
export interface NotifyEvent {
  /** CRIU's name for the moment: "pre-dump", "post-dump", "pre-restore", "post-restore", "pre-resume", "post-resume", ... */
  readonly script: string;
  /** The restored process's PID (post-restore and later), when CRIU sends one. */
  readonly pid: number | undefined;
  /**
   * Descriptors CRIU attached (orphan-pts-master sends the terminal master).
   * The client closes them after the handler returns unless the handler
   * calls claimFds(), which hands them over.
   */
  readonly fds: readonly number[];
  claimFds(): readonly number[];
}

export type NotifyHandler = (event: NotifyEvent) => boolean | Promise<boolean>;

/** Options common to requests that act on processes and images. */
export interface ImageOptions extends CallOptions {
  /** The images directory; opened here and passed to CRIU as a descriptor. */
  imagesDir: string;
  /** Relative to imagesDir; defaults to "<request>.log" (dump.log, restore.log, ...). */
  logFile?: string | undefined;
  /** 0 (none) to 4 (debug). Default 4: a failure is debugged from the log, and images live on tmpfs. */
  logLevel?: number | undefined;
}

/** PEM files for CRIU's TLS (GnuTLS): the CA both ends trust, this end's certificate and key. */
export interface PageTls {
  cacert: string;
  cert: string;
  key: string;
}

export type PageServerTarget =
  | {
      /** Numeric IP literal: CRIU does not resolve host names. */
      address: string;
      port: number;
      /** Encrypt the pages; the page server's certificate must name `address` (CRIU checks it). */
      tls?: PageTls | undefined;
    }
  | {
      /**
       * A connected stream socket of this process that carries the pages to
       * the page server (ps.fd, in a swrk worker): CRIU neither connects
       * nor encrypts, and a Unix socket here takes no TCP_CORK, so the
       * dump's last command is not held for the kernel's 200 ms cork timer.
       * Handed over to the call: closed here once the worker has it.
       */
      socket: number;
    };

export interface ProcessTreeOptions {
  shellJob?: boolean | undefined;
  tcpEstablished?: boolean | undefined;
  /** Dump established TCP connections as closed: restored closed, their peers get a reset. */
  tcpClose?: boolean | undefined;
  extUnixSk?: boolean | undefined;
  fileLocks?: boolean | undefined;
  linkRemap?: boolean | undefined;
  /** Resources outside the tree that CRIU should treat as external ("tty[...]", "mnt[...]"). */
  external?: readonly string[] | undefined;
  /** Directories CRIU searches for the path of a watched inode it cannot open by handle (irmap). */
  irmapScanPaths?: readonly string[] | undefined;
  networkLock?: 'iptables' | 'nftables' | 'skip' | undefined;
}

export interface PreDumpOptions extends ImageOptions, ProcessTreeOptions {
  pid: number;
  /** The previous round's directory, relative to imagesDir (e.g. "../1"). */
  parentImg?: string | undefined;
  /** Send pages to a page server instead of writing them to imagesDir. */
  pageServer?: PageServerTarget | undefined;
}

export interface DumpOptions extends PreDumpOptions {
  /** Ask the kernel to track dirty memory from here on (needed for a pre-dump to follow). */
  trackMem?: boolean | undefined;
  /** Keep the process running after a successful dump (default: CRIU kills it). */
  leaveRunning?: boolean | undefined;
  /** Leave the process stopped (SIGSTOP) after a successful dump instead of killing it. */
  leaveStopped?: boolean | undefined;
  /**
   * Post-copy: dump everything but the memory, then serve the memory on
   * this port (0: CRIU picks one and logs it) until a lazy-pages daemon
   * has fetched it all; the call returns then. pageServer is ignored.
   */
  lazyPages?: { port: number; tls?: PageTls | undefined } | undefined;
  onNotify?: NotifyHandler | undefined;
}

export interface RestoreOptions extends ImageOptions, ProcessTreeOptions {
  /** Leave the restored tree stopped (SIGSTOP) instead of running. */
  leaveStopped?: boolean | undefined;
  /** Post-copy: memory comes from a lazy-pages daemon already listening in imagesDir. */
  lazyPages?: boolean | undefined;
  onNotify?: NotifyHandler | undefined;
}

export interface PageServerOptions extends ImageOptions {
  /**
   * A connected stream socket of this process to serve instead of listening
   * (ps.fd, in a swrk worker): one dump's pages arrive on it. address and
   * port are then ignored; with tls, CRIU's page server still does its TLS
   * handshake on it (its dump side does not, on a ps.fd). Handed over to the
   * call, like a dump's: a
   * Node socket (paused, never read here) is destroyed here once CRIU has
   * its descriptor.
   */
  socket?: PassedFd | undefined;
  /** Numeric IP literal to listen on. */
  address: string;
  /** Omit to let CRIU pick a free port (reported back). */
  port?: number | undefined;
  parentImg?: string | undefined;
  /** Accept only a client with a certificate of this CA, and encrypt. */
  tls?: PageTls | undefined;
}

export interface CriuVersion {
  major: number;
  minor: number;
  sublevel: number;
  gitid: string | undefined;
  name: string | undefined;
  text: string;
}

export interface CriuFeatures {
  /** Dirty-memory tracking (soft-dirty): pre-copy needs it. */
  memTrack: boolean;
  /** userfaultfd lazy pages: post-copy needs it. */
  lazyPages: boolean;
  pidfdStore: boolean;
}

export interface DumpResult {
  /** Set when the tree was restored in the meantime (only in self-dump cases). */
  restored: boolean;
}

export interface RestoreResult {
  /** PID of the restored tree's root. */
  pid: number;
}

export interface PageServerResult {
  port: number;
  /** CRIU's report of the page server's PID; 4.1 reports 0 in service mode. */
  pid: number;
}

/** Default timeouts per request: quick queries fail fast, work on memory may take minutes. */
const DEFAULT_TIMEOUT_MS: Partial<Record<RequestTypeValue, number>> = {
  [RequestType.VERSION]: 10_000,
  [RequestType.CHECK]: 30_000,
  [RequestType.FEATURE_CHECK]: 30_000,
  [RequestType.CPUINFO_DUMP]: 30_000,
  [RequestType.CPUINFO_CHECK]: 30_000,
  [RequestType.PAGE_SERVER]: 30_000,
  [RequestType.PRE_DUMP]: 600_000,
  [RequestType.DUMP]: 600_000,
  [RequestType.RESTORE]: 600_000,
};

const LOG_NAMES: Partial<Record<RequestTypeValue, string>> = {
  [RequestType.CHECK]: 'check.log',
  [RequestType.PRE_DUMP]: 'pre-dump.log',
  [RequestType.DUMP]: 'dump.log',
  [RequestType.RESTORE]: 'restore.log',
  [RequestType.PAGE_SERVER]: 'page-server.log',
  [RequestType.CPUINFO_DUMP]: 'cpuinfo-dump.log',
  [RequestType.CPUINFO_CHECK]: 'cpuinfo-check.log',
};

/** criu_opts without the images directory, which #withImages fills in. */
type RpcOptions = Omit<FullRpcOptions, 'imagesDirFd'>;

interface CallPlan {
  type: RequestTypeValue;
  /** Descriptors of this process the call hands to CRIU: it runs in a swrk worker of its own. */
  passFds?: readonly PassedFd[] | undefined;
  opts?: FullRpcOptions | undefined;
  features?: RpcRequestMessage['features'];
  keepOpen?: boolean | undefined;
  logPath?: string | undefined;
  onNotify?: NotifyHandler | undefined;
  call: CallOptions;
}

/**
 * One typed method per CRIU request Ferry uses. Each call opens its own
 * connection (CRIU forks one worker per connection), so calls never
 * interfere with each other and a cancelled call takes down only its worker.
 * Cancelling closes the connection: see docs/criu.md for what CRIU then does.
 */
export class CriuClient {
  #features: Promise<CriuFeatures> | undefined;

  /**
   * `swrkBinary`: the CRIU binary for calls that hand CRIU a descriptor
   * (a page socket), which only a swrk worker accepts.
   */
  constructor(
    readonly endpoint: CriuEndpoint,
    readonly options: { swrkBinary?: string | undefined } = {},
  ) {}

  async version(options: CallOptions = {}): Promise<CriuVersion> {
    const resp = await this.#call({ type: RequestType.VERSION, call: options });
    const v = resp.version;
    if (v === null || v === undefined)
      throw new CriuProtocolError('CRIU answered VERSION without a version', 'VERSION');
    const sublevel = v.sublevel ?? 0;
    return {
      major: v.majorNumber,
      minor: v.minorNumber,
      sublevel,
      gitid: has(v, 'gitid') ? (v.gitid ?? undefined) : undefined,
      name: has(v, 'name') ? (v.name ?? undefined) : undefined,
      text: `${v.majorNumber}.${v.minorNumber}${has(v, 'sublevel') ? `.${sublevel}` : ''}`,
    };
  }

  /**
   * CRIU's own check of the kernel; resolves when CRIU says it can work here.
   * CRIU's service needs a directory for the check's log (it fails the
   * request without one): workDir, or a temporary one kept only on failure.
   */
  async check(options: CallOptions & { workDir?: string | undefined } = {}): Promise<void> {
    const dir = options.workDir ?? (await mkdtemp(join(tmpdir(), 'ferry-check-')));
    await this.#withImages(RequestType.CHECK, { ...options, imagesDir: dir }, {}, undefined);
    if (options.workDir === undefined) await rm(dir, { recursive: true, force: true });
  }

  /** Which optional kernel features this machine has. Cached after the first answer unless `refresh`. */
  featureCheck(options: CallOptions & { refresh?: boolean | undefined } = {}): Promise<CriuFeatures> {
    if (this.#features === undefined || options.refresh === true) {
      const pending = this.#queryFeatures(options);
      this.#features = pending;
      // A failed probe is not cached: the next caller asks again.
      pending.catch(() => {
        if (this.#features === pending) this.#features = undefined;
      });
    }
    return this.#features;
  }

  async #queryFeatures(options: CallOptions): Promise<CriuFeatures> {
    const resp = await this.#call({
      type: RequestType.FEATURE_CHECK,
      features: { memTrack: true, lazyPages: true, pidfdStore: true },
      call: options,
    });
    const f = resp.features ?? {};
    return { memTrack: f.memTrack === true, lazyPages: f.lazyPages === true, pidfdStore: f.pidfdStore === true };
  }

  /** Writes this machine's CPU description (cpuinfo.img) into imagesDir. */
  async cpuinfoDump(options: ImageOptions): Promise<void> {
    await this.#withImages(RequestType.CPUINFO_DUMP, options, {}, undefined);
  }

  /** Checks that the CPU described by imagesDir/cpuinfo.img can run here; throws CriuOperationError if not. */
  async cpuinfoCheck(options: ImageOptions): Promise<void> {
    await this.#withImages(RequestType.CPUINFO_CHECK, options, {}, undefined);
  }

  /**
   * One pre-copy round: dumps memory while the process keeps running and
   * starts (or continues) dirty tracking. Refused up front on kernels
   * without memory tracking, where CRIU would abort on a BUG().
   */
  async preDump(options: PreDumpOptions): Promise<void> {
    const features = await this.featureCheck({ signal: options.signal });
    if (!features.memTrack) {
      throw new CriuUnsupportedError(
        'mem_track',
        'this kernel cannot track dirty memory, so CRIU cannot pre-dump here',
        {
          hint: 'use a single dump (stop-and-copy) instead; pre-copy needs a kernel built with CONFIG_MEM_SOFT_DIRTY',
        },
      );
    }
    assertProcessExists(options.pid);
    await this.#withImages(
      RequestType.PRE_DUMP,
      options,
      { ...processOpts(options), pid: options.pid, trackMem: true, ...pageServerOpts(options) },
      undefined,
      false,
      pageSocket(options),
    );
  }

  /**
   * The final dump. With onNotify the caller sees each step and can hold
   * post-dump to keep the process frozen until it decides.
   */
  async dump(options: DumpOptions): Promise<DumpResult> {
    assertProcessExists(options.pid);
    const opts: RpcOptions = { ...processOpts(options), pid: options.pid, ...pageServerOpts(options) };
    if (options.trackMem !== undefined) opts.trackMem = options.trackMem;
    if (options.leaveRunning !== undefined) opts.leaveRunning = options.leaveRunning;
    if (options.leaveStopped !== undefined) opts.leaveStopped = options.leaveStopped;
    if (options.lazyPages !== undefined) {
      // In lazy mode CRIU takes only the port from ps and listens on every address.
      opts.lazyPages = true;
      opts.ps = { port: options.lazyPages.port };
      if (options.lazyPages.tls !== undefined) Object.assign(opts, tlsOpts(options.lazyPages.tls));
    }
    const resp = await this.#withImages(
      RequestType.DUMP,
      options,
      opts,
      options.onNotify,
      false,
      options.lazyPages === undefined ? pageSocket(options) : undefined,
    );
    return { restored: resp.dump?.restored === true };
  }

  async restore(options: RestoreOptions): Promise<RestoreResult> {
    const opts: RpcOptions = { ...processOpts(options) };
    if (options.leaveStopped !== undefined) opts.leaveStopped = options.leaveStopped;
    if (options.lazyPages === true) opts.lazyPages = true;
    const resp = await this.#withImages(RequestType.RESTORE, options, opts, options.onNotify);
    const pid = resp.restore?.pid;
    if (pid === undefined || pid <= 0) throw new CriuProtocolError('CRIU answered RESTORE without a PID', 'RESTORE');
    return { pid };
  }

  /**
   * Starts a page server that receives one dump into imagesDir and then
   * exits. Without a port, CRIU binds a free one and reports it.
   */
  async pageServer(options: PageServerOptions): Promise<PageServerResult> {
    const ps: { address?: string; port?: number; fd?: number } =
      options.socket !== undefined ? { fd: SWRK_FIRST_FD } : { address: options.address };
    if (options.port !== undefined && options.socket === undefined) ps.port = options.port;
    const opts: RpcOptions = { ps };
    if (options.parentImg !== undefined) opts.parentImg = options.parentImg;
    if (options.tls !== undefined) {
      // CRIU's page server checks the CLIENT's certificate against its own
      // listening address (opts.addr serves both ends in tls.c), which no
      // client certificate names; the CA signature is what authenticates
      // the source, so the name check is off on this end only.
      Object.assign(opts, tlsOpts(options.tls), { tlsNoCnVerify: true });
    }
    const resp = await this.#withImages(
      RequestType.PAGE_SERVER,
      options,
      opts,
      undefined,
      true,
      options.socket === undefined ? undefined : [options.socket],
    );
    const port = resp.ps?.port ?? 0;
    if (options.socket === undefined && port <= 0) {
      throw new CriuProtocolError('CRIU answered PAGE_SERVER without a port', 'PAGE_SERVER');
    }
    return { port, pid: resp.ps?.pid ?? 0 };
  }

  async #withImages(
    type: RequestTypeValue,
    options: ImageOptions,
    opts: RpcOptions,
    onNotify: NotifyHandler | undefined,
    keepOpen?: boolean,
    passFds?: readonly PassedFd[],
  ): Promise<RpcResponseMessage> {
    const logFile = options.logFile ?? LOG_NAMES[type] ?? 'criu.log';
    const dirFd = openImagesDir(options.imagesDir);
    try {
      return await this.#call({
        type,
        opts: {
          ...opts,
          imagesDirFd: dirFd,
          logFile,
          logLevel: options.logLevel ?? 4,
          // Always for DUMP and RESTORE: with notify_scripts CRIU notices a
          // client that went away (cancelled call, crashed agent) at the next
          // notification and rolls back: a dump resumes the process instead of
          // killing it, a restore kills the half-made copy (docs/criu.md).
          ...(onNotify !== undefined || type === RequestType.DUMP || type === RequestType.RESTORE
            ? { notifyScripts: true }
            : {}),
        },
        keepOpen,
        passFds,
        logPath: join(options.imagesDir, logFile),
        onNotify,
        call: options,
      });
    } finally {
      closeSync(dirFd);
    }
  }

  /** The service, or a swrk worker of its own for a call that hands CRIU descriptors. */
  #endpointFor(plan: CallPlan): CriuEndpoint {
    if (plan.passFds === undefined || plan.passFds.length === 0) return this.endpoint;
    const binary = this.options.swrkBinary;
    if (binary === undefined) {
      throw new CriuServiceUnavailableError(`${requestTypeName(plan.type)} with a page socket needs a swrk worker`, {
        hint: 'construct the client with swrkBinary',
      });
    }
    return new SwrkEndpoint(binary, plan.passFds);
  }

  async #call(plan: CallPlan): Promise<RpcResponseMessage> {
    const name = requestTypeName(plan.type);
    const timeoutMs = plan.call.timeoutMs ?? DEFAULT_TIMEOUT_MS[plan.type] ?? 60_000;
    const { signal, dispose } = callSignal(plan.call.signal, timeoutMs, `CRIU's answer to ${name}`);
    let connection: PacketConnection | undefined;
    try {
      if (signal.aborted) throw abortReason(signal, name);
      try {
        connection = await this.#endpointFor(plan).connect({ signal });
      } finally {
        // Handed over: the worker has its own copies now (or never will).
        for (const fd of plan.passFds ?? []) {
          if (typeof fd === 'number') closeAll([fd]);
          else fd.destroy();
        }
      }
      const request: RpcRequestMessage = { type: plan.type };
      if (plan.opts !== undefined) request.opts = plan.opts;
      if (plan.features !== undefined) request.features = plan.features;
      if (plan.keepOpen === true) request.keepOpen = true;
      send(connection, request, name);
      for (;;) {
        const received = await receiveResponse(connection, name, signal, plan.logPath);
        const { resp } = received;
        if (resp.type === RequestType.NOTIFY) {
          const answer = await answerNotify(received, plan.onNotify, signal, name);
          send(connection, { type: RequestType.NOTIFY, notifySuccess: answer }, name);
          continue;
        }
        closeAll(received.fds);
        if (resp.type !== plan.type) {
          throw new CriuProtocolError(`CRIU answered ${name} with a ${requestTypeName(resp.type)} response`, name);
        }
        if (!resp.success) throw await operationError(name, resp, plan.logPath);
        return resp;
      }
    } catch (error) {
      if (signal.aborted && !(error instanceof FerryError && error.code !== 'ABORTED' && error.code !== 'TIMEOUT')) {
        throw abortReason(signal, name);
      }
      throw error;
    } finally {
      connection?.close();
      dispose();
    }
  }
}

/** The descriptor of a Node socket (its handle's; Node has no public accessor). */
export function socketDescriptor(socket: Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('the socket has no descriptor to hand over');
  return fd;
}

/** The page socket a dump or pre-dump hands CRIU, if its target is one. */
function pageSocket(o: PreDumpOptions): number[] | undefined {
  return o.pageServer !== undefined && 'socket' in o.pageServer ? [o.pageServer.socket] : undefined;
}

function send(connection: PacketConnection, request: RpcRequestMessage, name: string): void {
  try {
    connection.send(RpcRequest.encode(request).finish());
  } catch (cause) {
    throw new CriuDisconnectedError(name, { cause });
  }
}

interface Received {
  resp: RpcResponseMessage;
  /** Descriptors attached to the packet (SCM_RIGHTS); owned by whoever handles the response. */
  fds: number[];
}

async function receiveResponse(
  connection: PacketConnection,
  name: string,
  signal: AbortSignal,
  logPath: string | undefined,
): Promise<Received> {
  const packet = await connection.receive({ signal });
  if (packet === null) {
    const excerpt = logPath === undefined ? undefined : await readLogExcerpt(logPath);
    throw new CriuDisconnectedError(name, { logFile: logPath, logTail: excerpt?.tail ?? [] });
  }
  try {
    return { resp: RpcResponse.decode(packet.data), fds: [...packet.fds] };
  } catch (cause) {
    closeAll(packet.fds);
    throw new CriuProtocolError(
      `CRIU sent a response to ${name} that does not decode: ${(cause as Error).message}`,
      name,
      {
        cause,
      },
    );
  }
}

async function answerNotify(
  { resp, fds }: Received,
  handler: NotifyHandler | undefined,
  signal: AbortSignal,
  name: string,
): Promise<boolean> {
  let claimed = false;
  const notify = resp.notify;
  const event: NotifyEvent = {
    script: notify?.script ?? '',
    pid: notify !== null && notify !== undefined && has(notify, 'pid') ? (notify.pid ?? undefined) : undefined,
    fds,
    claimFds: () => {
      claimed = true;
      return fds;
    },
  };
  try {
    if (handler === undefined) return true;
    return await raceAbort(Promise.resolve(handler(event)), signal, name);
  } finally {
    if (!claimed) closeAll(fds);
  }
}

async function operationError(
  name: string,
  resp: RpcResponseMessage,
  logPath: string | undefined,
): Promise<CriuOperationError> {
  const excerpt = logPath === undefined ? undefined : await readLogExcerpt(logPath);
  return new CriuOperationError({
    request: name,
    crErrno: has(resp, 'crErrno') ? resp.crErrno : undefined,
    crErrmsg: has(resp, 'crErrmsg') ? (resp.crErrmsg ?? undefined) : undefined,
    logFile: excerpt === undefined ? undefined : logPath,
    logTail: excerpt?.tail,
    logErrors: excerpt?.errors,
  });
}

/** The caller's signal combined with this call's timeout, whose reason says what was awaited. */
function callSignal(
  outer: AbortSignal | undefined,
  timeoutMs: number,
  waitingFor: string,
): { signal: AbortSignal; dispose: () => void } {
  const controller = new AbortController();
  const onOuterAbort = (): void => controller.abort(outer?.reason);
  if (outer?.aborted === true) controller.abort(outer.reason);
  else outer?.addEventListener('abort', onOuterAbort, { once: true });
  const timer =
    timeoutMs > 0 && Number.isFinite(timeoutMs)
      ? setTimeout(() => controller.abort(new TimeoutError(waitingFor, timeoutMs)), timeoutMs)
      : undefined;
  return {
    signal: controller.signal,
    dispose: () => {
      if (timer !== undefined) clearTimeout(timer);
      outer?.removeEventListener('abort', onOuterAbort);
    },
  };
}

function raceAbort<T>(promise: Promise<T>, signal: AbortSignal, name: string): Promise<T> {
  if (signal.aborted) return Promise.reject(abortReason(signal, name));
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(abortReason(signal, name));
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(error instanceof Error ? error : new Error(String(error)));
      },
    );
  });
}

function openImagesDir(dir: string): number {
  try {
    return openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  } catch (cause) {
    const code = (cause as { code?: unknown }).code;
    throw new ImagesDirError(dir, {
      cause,
      hint:
        code === 'ENOENT'
          ? 'the directory does not exist: create it first'
          : code === 'ENOTDIR'
            ? 'that path is a file, not a directory'
            : undefined,
    });
  }
}

function assertProcessExists(pid: number): void {
  if (!Number.isSafeInteger(pid) || pid <= 0) throw new ProcessNotFoundError(pid);
  if (!existsSync(`/proc/${pid}`)) throw new ProcessNotFoundError(pid);
}

function processOpts(o: ProcessTreeOptions): RpcOptions {
  const opts: RpcOptions = {};
  if (o.shellJob !== undefined) opts.shellJob = o.shellJob;
  if (o.tcpEstablished !== undefined) opts.tcpEstablished = o.tcpEstablished;
  if (o.tcpClose !== undefined) opts.tcpClose = o.tcpClose;
  if (o.extUnixSk !== undefined) opts.extUnixSk = o.extUnixSk;
  if (o.fileLocks !== undefined) opts.fileLocks = o.fileLocks;
  if (o.linkRemap !== undefined) opts.linkRemap = o.linkRemap;
  if (o.external !== undefined) opts.external = [...o.external];
  if (o.irmapScanPaths !== undefined) opts.irmapScanPaths = [...o.irmapScanPaths];
  if (o.networkLock !== undefined) {
    opts.networkLock = {
      iptables: NetworkLockMethod.IPTABLES,
      nftables: NetworkLockMethod.NFTABLES,
      skip: NetworkLockMethod.SKIP,
    }[o.networkLock];
  }
  return opts;
}

function pageServerOpts(o: PreDumpOptions): RpcOptions {
  const opts: RpcOptions = {};
  if (o.parentImg !== undefined) opts.parentImg = o.parentImg;
  if (o.pageServer !== undefined && 'socket' in o.pageServer) opts.ps = { fd: SWRK_FIRST_FD };
  else if (o.pageServer !== undefined) {
    opts.ps = { address: o.pageServer.address, port: o.pageServer.port };
    if (o.pageServer.tls !== undefined) Object.assign(opts, tlsOpts(o.pageServer.tls));
  }
  return opts;
}

function tlsOpts(tls: PageTls): RpcOptions {
  return { tls: true, tlsCacert: tls.cacert, tlsCert: tls.cert, tlsKey: tls.key };
}
