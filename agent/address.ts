/**
 * A workload's service address on this node: added, withdrawn, announced
 * to the neighbours, and its packets held while the process is being
 * restored (docs/network.md, "The address that moves").
 *
 * `ip` is the system's iproute2; `nft` and `arping` come with CRIU in the
 * project prefix (scripts/install-criu) and run beside its criu binary, or
 * from PATH where CRIU is the system's.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import type { ServiceAddress } from '../src/address.js';
import { FerryError } from '../src/errors.js';
import { log } from '../src/log.js';

const run = promisify(execFile);

export class AddressError extends FerryError {
  readonly code = 'ADDRESS';
}

/** What the roles ask of this node's network for a service address. */
export interface AddressPort {
  /** The interface that has the address here, or undefined. */
  holder(ip: string): Promise<string | undefined>;
  /** Adds it to the interface that routes to it (or `device`); resolves with that interface. */
  add(a: ServiceAddress, device?: string): Promise<string>;
  /** Removes it, and stops announcing it; an address that is gone already is not an error. */
  remove(a: ServiceAddress, device: string): Promise<void>;
  /**
   * Tells the neighbours the address is here now: gratuitous ARP, repeated in
   * the background until done or until the address is removed here (a
   * repeat after a rollback gave it back would point the neighbours here
   * again).
   */
  announce(a: ServiceAddress, device: string): void;
  /** Drops every packet to the address until `release`: no reset reaches a client before its socket is back. */
  block(id: string, a: ServiceAddress): Promise<void>;
  release(id: string): Promise<void>;
  /** Deletes CRIU's lock table of a dump (`inet CRIU-<run id>`), left here when the copy was restored elsewhere. */
  dropCriuLock(runId: string): Promise<void>;
  /** Why this node cannot take the address ('' when it can): it has it already, or no interface routes to it. */
  problem(a: ServiceAddress): Promise<string>;
  /** Why the hook cannot run here ('' when it can). */
  hookProblem(hook: string): string;
  /** Runs the address hook; rejects with its output when it fails or outlives the timeout. */
  hook(hook: string, action: 'take' | 'return', env: HookEnv, timeoutMs?: number): Promise<void>;
}

/** What an address hook is told, as environment variables (docs/network.md, "The address hook"). */
export interface HookEnv {
  address: string;
  workload: string;
  migration: string;
  /** The node the hook runs on. */
  node: string;
  /** The other agent of the migration, as a URL. */
  peer: string;
}

/** How long an address hook may run before the step fails. */
export const HOOK_TIMEOUT_MS = 10_000;
/** How often the address is announced, a second apart; the first goes out at once. */
const ANNOUNCEMENTS = 3;

export function realAddresses(criuBinary: string): AddressPort {
  const announcing = new Map<string, ChildProcess>();
  const stopAnnouncing = (ip: string): void => {
    announcing.get(ip)?.kill('SIGKILL');
    announcing.delete(ip);
  };
  const tool = (name: string): string => {
    const beside = join(dirname(criuBinary), name);
    return existsSync(beside) ? beside : name;
  };
  const ip = async (...args: string[]): Promise<string> => {
    try {
      return (await run('ip', args, { timeout: 5_000 })).stdout;
    } catch (error) {
      throw new AddressError(`ip ${args.join(' ')}: ${stderrOf(error)}`);
    }
  };
  const nft = async (script: string): Promise<void> => {
    await new Promise<void>((resolve, reject) => {
      const child = spawn(tool('nft'), ['-f', '-'], { stdio: ['pipe', 'ignore', 'pipe'], timeout: 5_000 });
      let err = '';
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      child.on('error', (e) => reject(new AddressError(`nft: ${e.message}`)));
      child.on('exit', (code) =>
        code === 0 ? resolve() : reject(new AddressError(`nft: ${err.trim() || `exit code ${code}`}`)),
      );
      child.stdin.end(script);
    });
  };
  const holder = async (address: string): Promise<string | undefined> => {
    const out = await ip('-o', '-4', 'addr', 'show', 'to', `${address}/32`);
    return out.trim().split(/\s+/)[1];
  };
  const routeDevice = async (address: string): Promise<string | undefined> => {
    const out = await ip('-o', '-4', 'route', 'get', address).catch(() => '');
    return / dev (\S+)/.exec(out)?.[1];
  };
  return {
    holder,
    async add(a, device) {
      const dev = device ?? (await routeDevice(a.ip));
      if (dev === undefined) throw new AddressError(`no interface here routes to ${a.ip}`);
      await ip('addr', 'add', a.cidr, 'dev', dev);
      return dev;
    },
    async remove(a, device) {
      stopAnnouncing(a.ip);
      if ((await holder(a.ip)) === undefined) return;
      await ip('addr', 'del', a.cidr, 'dev', device);
    },
    announce(a, device) {
      stopAnnouncing(a.ip);
      const child = spawn(tool('arping'), ['-U', '-c', String(ANNOUNCEMENTS), '-I', device, a.ip], {
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let err = '';
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      child.on('error', (e) => log.warn('cannot announce the address', { address: a.ip, error: e.message }));
      child.on('exit', (code, signal) => {
        if (announcing.get(a.ip) === child) announcing.delete(a.ip);
        if (signal === null && code !== 0 && code !== 1) {
          log.warn('announcing the address failed', { address: a.ip, error: err.trim() });
        }
      });
      announcing.set(a.ip, child);
      child.unref();
    },
    async block(id, a) {
      await nft(
        `table inet ${holdTable(id)} {\n` +
          `  chain input { type filter hook input priority -10; policy accept; ip daddr ${a.ip} drop; }\n` +
          `}\n`,
      );
    },
    async release(id) {
      await nft(`delete table inet ${holdTable(id)}\n`).catch((error: unknown) => {
        if (!/No such file|does not exist/i.test((error as Error).message)) throw error;
      });
    },
    async dropCriuLock(runId) {
      if (!/^[0-9a-f-]{8,64}$/.test(runId)) throw new AddressError(`not a CRIU run id: ${runId}`);
      await nft(`delete table inet ${criuLockTable(runId)}\n`).catch((error: unknown) => {
        if (!/No such file|does not exist/i.test((error as Error).message)) throw error;
      });
    },
    async problem(a) {
      const has = await holder(a.ip);
      if (has !== undefined) return `${a.ip} is already on ${has} there`;
      if ((await routeDevice(a.ip)) === undefined) return `no interface there routes to ${a.ip}`;
      return '';
    },
    hookProblem(hook) {
      try {
        accessSync(hook, constants.X_OK);
        return '';
      } catch {
        return `${hook} is not an executable file there`;
      }
    },
    hook(hook, action, env, timeoutMs = HOOK_TIMEOUT_MS) {
      return runHook(hook, action, env, timeoutMs);
    },
  };
}

/**
 * CRIU's lock table: it prints "inet CRIU-<run id>" into a 32-byte buffer
 * (criu/netfilter.c, nftables_get_table), so the name keeps only the
 * first 21 characters of the run id.
 */
export function criuLockTable(runId: string): string {
  return `CRIU-${runId}`.slice(0, 32 - 1 - 'inet '.length);
}

/** The table that holds a moving address's packets on the destination while its process is restored. */
function holdTable(id: string): string {
  return `ferry-hold-${id}`;
}

async function runHook(hook: string, action: 'take' | 'return', env: HookEnv, timeoutMs: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const child = spawn(hook, [action, env.address], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        ...process.env,
        FERRY_ACTION: action,
        FERRY_ADDRESS: env.address,
        FERRY_WORKLOAD: env.workload,
        FERRY_MIGRATION: env.migration,
        FERRY_NODE: env.node,
        FERRY_PEER: env.peer,
      },
      detached: true,
    });
    let out = '';
    const keep = (d: Buffer): void => {
      out = (out + d.toString()).slice(-2_000);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    const timer = setTimeout(() => {
      try {
        process.kill(-(child.pid ?? 0), 'SIGKILL');
      } catch {
        // gone
      }
      reject(new AddressError(`the address hook ${hook} ${action} did not finish within ${timeoutMs / 1000} s`));
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new AddressError(`the address hook ${hook} cannot run: ${e.message}`));
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) return resolve();
      const tail = out.trim().split('\n').slice(-3).join(' / ');
      reject(
        new AddressError(
          `the address hook ${hook} ${action} failed (${signal ?? `exit code ${code}`})${tail ? `: ${tail}` : ''}`,
        ),
      );
    });
  });
}

function stderrOf(error: unknown): string {
  const e = error as { stderr?: string; message?: string };
  return (e.stderr ?? '').trim() || e.message || String(error);
}
