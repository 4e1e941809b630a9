import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pRetry from 'p-retry';
import { abortReason } from '../errors.js';
import { resolveCriuBinary, type CriuBinary } from './binary.js';
import { CriuClient, CriuSocketEndpoint, type CriuEndpoint, type CriuVersion } from './client.js';
import { CriuServiceUnavailableError } from './errors.js';
import { readLogExcerpt } from './log.js';
import type { PacketConnection } from './transport.js';

const SETPRIV = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p));

export type CriuServiceState = 'starting' | 'running' | 'restarting' | 'stopping' | 'stopped' | 'failed';

export interface CriuServiceEvent {
  state: CriuServiceState;
  pid?: number | undefined;
  /** Why the state changed (exit code or signal of a service that died, an error). */
  reason?: string | undefined;
}

export interface CriuServiceOptions {
  /** The CRIU binary; resolved with resolveCriuBinary() when omitted. */
  binary?: CriuBinary | undefined;
  /** Parent of the private runtime directory (socket, service log). Default: the OS temp dir. */
  runtimeParent?: string | undefined;
  /** How long a start may take before it counts as failed. */
  startTimeoutMs?: number | undefined;
  /** Restart attempts after the service dies, before giving up (state "failed"). */
  maxRestartAttempts?: number | undefined;
  /**
   * How often to ask the running service for its VERSION, to catch a service
   * that is alive but no longer answers (0: never). Default 30 s.
   */
  healthCheckIntervalMs?: number | undefined;
  /** How long a health check waits for the answer. Default 5 s. */
  healthCheckTimeoutMs?: number | undefined;
  onStateChange?: ((event: CriuServiceEvent) => void) | undefined;
  signal?: AbortSignal | undefined;
}

/**
 * Runs `criu service` on a private socket and keeps it running: a service
 * that dies is restarted (with backoff), and a connect that finds it dead
 * waits for the restart. Workers forked for calls in flight are CRIU's own
 * processes and finish their call even when the master is restarted.
 */
export class CriuService implements CriuEndpoint {
  #state: CriuServiceState = 'starting';
  #child: ChildProcess | undefined;
  #ready: Promise<void> | undefined;
  #restarts = 0;
  #version: CriuVersion | undefined;
  readonly #stderr: string[] = [];

  private constructor(
    readonly binary: CriuBinary,
    readonly runtimeDir: string,
    private readonly options: CriuServiceOptions,
  ) {}

  /** Starts a supervised `criu service`; resolves once it answers a VERSION request. */
  static async start(options: CriuServiceOptions = {}): Promise<CriuService> {
    const binary = options.binary ?? resolveCriuBinary();
    const runtimeDir = await mkdtemp(join(options.runtimeParent ?? tmpdir(), 'ferry-criu-'));
    const service = new CriuService(binary, runtimeDir, options);
    try {
      service.#ready = service.#launch(options.signal);
      await service.#ready;
    } catch (error) {
      await service.stop();
      throw error;
    }
    service.#startHealthChecks();
    return service;
  }

  get socketPath(): string {
    return join(this.runtimeDir, 'criu.sock');
  }

  get logFile(): string {
    return join(this.runtimeDir, 'service.log');
  }

  get state(): CriuServiceState {
    return this.#state;
  }

  get pid(): number | undefined {
    return this.#child?.pid;
  }

  /** How many times the service was restarted after dying. */
  get restarts(): number {
    return this.#restarts;
  }

  /** The version the running service reported when it started. */
  get version(): CriuVersion | undefined {
    return this.#version;
  }

  /** A client bound to this service. */
  client(): CriuClient {
    return new CriuClient(this, { swrkBinary: this.binary.path });
  }

  async connect(options: { signal?: AbortSignal | undefined } = {}): Promise<PacketConnection> {
    if (this.#state === 'stopping' || this.#state === 'stopped') {
      throw new CriuServiceUnavailableError('the CRIU service has been stopped', { hint: 'start a new one' });
    }
    if (this.#state === 'failed') {
      throw new CriuServiceUnavailableError(
        `the CRIU service cannot be started: ${this.#failure ?? 'unknown reason'}`,
        {
          hint: `read ${this.logFile}`,
        },
      );
    }
    await this.#whenReady(options.signal);
    try {
      return await new CriuSocketEndpoint(this.socketPath).connect();
    } catch (error) {
      // A refused connect on our private socket means the service is dying or
      // dead; its exit event may still be on its way. Wait for it briefly,
      // then for the restart, and try once more.
      if (this.#state === 'running' && this.#childExited !== undefined) {
        await Promise.race([this.#childExited, new Promise((resolve) => setTimeout(resolve, 1_000))]);
      }
      if (this.#state !== 'running' || !this.#isAlive()) {
        this.#onExit('connect found the service gone');
        await this.#whenReady(options.signal);
        return new CriuSocketEndpoint(this.socketPath).connect();
      }
      throw error;
    }
  }

  /** Stops the service and removes its runtime directory. Idempotent. */
  async stop(): Promise<void> {
    if (this.#state === 'stopped') return;
    if (this.#healthTimer !== undefined) clearInterval(this.#healthTimer);
    this.#setState('stopping');
    const child = this.#child;
    if (child !== undefined && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 2_000);
      await exited;
      clearTimeout(timer);
    }
    await rm(this.runtimeDir, { recursive: true, force: true });
    this.#setState('stopped');
  }

  #failure: string | undefined;
  #childExited: Promise<void> | undefined;
  #healthTimer: NodeJS.Timeout | undefined;
  #checking = false;

  #startHealthChecks(): void {
    const interval = this.options.healthCheckIntervalMs ?? 30_000;
    if (interval <= 0) return;
    this.#healthTimer = setInterval(() => void this.#healthCheck(), interval);
    this.#healthTimer.unref();
  }

  /** A service that is alive but does not answer is killed; its exit restarts it. */
  async #healthCheck(): Promise<void> {
    if (this.#state !== 'running' || this.#checking) return;
    this.#checking = true;
    const child = this.#child;
    try {
      await new CriuClient(new CriuSocketEndpoint(this.socketPath)).version({
        timeoutMs: this.options.healthCheckTimeoutMs ?? 5_000,
      });
    } catch (error) {
      if (this.#state === 'running' && child === this.#child) {
        this.options.onStateChange?.({
          state: 'running',
          pid: child?.pid,
          reason: `health check failed (${(error as Error).message}); killing the service to restart it`,
        });
        child?.kill('SIGKILL');
      }
    } finally {
      this.#checking = false;
    }
  }

  async #whenReady(signal: AbortSignal | undefined): Promise<void> {
    const ready = this.#ready;
    if (ready === undefined) return;
    if (signal === undefined) return ready;
    if (signal.aborted) throw abortReason(signal, 'waiting for the CRIU service');
    await Promise.race([
      ready,
      new Promise<never>((_, reject) =>
        signal.addEventListener('abort', () => reject(abortReason(signal, 'waiting for the CRIU service')), {
          once: true,
        }),
      ),
    ]);
  }

  #isAlive(): boolean {
    const child = this.#child;
    return child !== undefined && child.exitCode === null && child.signalCode === null;
  }

  /** Spawns the service and waits until it answers; retried with backoff by p-retry. */
  #launch(signal: AbortSignal | undefined): Promise<void> {
    const attempts = this.options.maxRestartAttempts ?? 5;
    return pRetry(() => this.#spawnOnce(), {
      retries: this.#restarts === 0 && this.#state === 'starting' ? 0 : attempts,
      minTimeout: 100,
      maxTimeout: 2_000,
      signal,
      shouldRetry: () => this.#state !== 'stopping' && this.#state !== 'stopped',
    }).then(
      () => this.#setState('running'),
      (error: unknown) => {
        if (this.#state !== 'stopping' && this.#state !== 'stopped') {
          this.#failure = (error as Error).message;
          this.#setState('failed', this.#failure);
        }
        throw error;
      },
    );
  }

  async #spawnOnce(): Promise<void> {
    if (this.#state === 'stopping' || this.#state === 'stopped') {
      throw new CriuServiceUnavailableError('the CRIU service is stopping');
    }
    await rm(this.socketPath, { force: true });
    this.#stderr.length = 0;
    const args = ['service', '--address', this.socketPath, '-W', this.runtimeDir, '-o', 'service.log', '-v4'];
    // setpriv --pdeathsig: the service dies with us rather than outliving a crashed agent.
    const child =
      SETPRIV === undefined
        ? spawn(this.binary.path, args, { stdio: ['ignore', 'ignore', 'pipe'] })
        : spawn(SETPRIV, ['--pdeathsig', 'SIGTERM', '--', this.binary.path, ...args], {
            stdio: ['ignore', 'ignore', 'pipe'],
          });
    this.#child = child;
    this.#childExited = new Promise((resolve) => child.once('exit', () => resolve()));
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (chunk: string) => {
      this.#stderr.push(chunk);
      if (this.#stderr.length > 50) this.#stderr.shift();
    });
    const spawnError = new Promise<never>((_, reject) => {
      child.once('error', (cause) =>
        reject(
          new CriuServiceUnavailableError(`cannot start ${this.binary.path}: ${cause.message}`, {
            cause,
            hint: 'check that the CRIU binary exists and is executable (scripts/install-criu)',
          }),
        ),
      );
    });
    spawnError.catch(() => undefined);
    child.once('exit', (code, sig) => {
      if (this.#child === child) this.#onExit(sig === null ? `exit code ${code}` : `signal ${sig}`);
    });
    const deadline = Date.now() + (this.options.startTimeoutMs ?? 10_000);
    for (;;) {
      if (!this.#isAlive() && this.#child === child) {
        await Promise.race([spawnError, Promise.resolve()]);
        throw await this.#startFailure(child);
      }
      if (existsSync(this.socketPath)) {
        try {
          this.#version = await new CriuClient(new CriuSocketEndpoint(this.socketPath)).version({ timeoutMs: 5_000 });
          return;
        } catch {
          // not accepting yet
        }
      }
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new CriuServiceUnavailableError(
          `criu service did not answer within ${this.options.startTimeoutMs ?? 10_000} ms`,
          {
            hint: `read ${this.logFile}`,
          },
        );
      }
      await Promise.race([spawnError, new Promise((resolve) => setTimeout(resolve, 20))]);
    }
  }

  async #startFailure(child: ChildProcess): Promise<CriuServiceUnavailableError> {
    const excerpt = await readLogExcerpt(this.logFile, 10);
    const why = [...(excerpt?.errors ?? []), this.#stderr.join('').trim()].filter((s) => s !== '').join('; ');
    const missing = child.exitCode === 127 || /No such file or directory/.test(why);
    return new CriuServiceUnavailableError(
      `criu service exited at start (${child.signalCode ?? `exit code ${child.exitCode}`})${why === '' ? '' : `: ${why}`}`,
      {
        hint: missing
          ? `the CRIU binary ${this.binary.path} is gone: reinstall it (scripts/install-criu) or point FERRY_CRIU at one, then restart the agent`
          : `CRIU needs root and a kernel it supports; run \`${this.binary.path} check\``,
      },
    );
  }

  /** The service died (or was found dead): restart it unless stopping. */
  #onExit(reason: string): void {
    if (this.#state === 'stopping' || this.#state === 'stopped' || this.#state === 'restarting') return;
    if (this.#state === 'starting') return; // the start loop sees it and reports
    this.#restarts += 1;
    this.#setState('restarting', reason);
    this.#ready = this.#launch(this.options.signal);
    this.#ready.catch(() => undefined);
  }

  #setState(state: CriuServiceState, reason?: string): void {
    if (this.#state === state) return;
    this.#state = state;
    this.options.onStateChange?.({ state, pid: this.#child?.pid, reason });
  }
}
