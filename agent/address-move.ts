/**
 * The address step of a switchover, each side's half (docs/network.md):
 * the source lets the workload's address go once the process is frozen
 * and takes it back if the migration rolls back; the destination holds the
 * address's packets, takes it and announces it before the restore, and
 * gives it up if its copy is discarded. The journal records which interface
 * held it, so that recovery can do the same after a crash.
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseServiceAddress, type ServiceAddress } from '../src/address.js';
import { log } from '../src/log.js';
import type { WorkloadSpec } from '../src/wire/index.js';
import { AddressError } from './address.js';
import type { AgentContext } from './context.js';

/** A workload's service address, moving with it in one migration. */
export interface MovingAddress {
  readonly address: ServiceAddress;
  /** The address hook ('' when none). */
  readonly hook: string;
  readonly workload: string;
  /** The interface it is on here, while this agent holds it. */
  device?: string | undefined;
}

/** The address a workload (its record, or the spec that came with it) owns, if any. */
export function movingAddress(
  w: Pick<WorkloadSpec, 'name' | 'address' | 'addressHook'> | undefined,
): MovingAddress | undefined {
  if (!w?.address) return undefined;
  return { address: parseServiceAddress(w.address), hook: w.addressHook ?? '', workload: w.name ?? '' };
}

/** Source, the process frozen: the address leaves this node. Its packets now go nowhere until the destination has it. */
export async function letGo(context: AgentContext, id: string, moving: MovingAddress): Promise<void> {
  const { addresses, journal } = context;
  const device = await addresses.holder(moving.address.ip);
  if (device === undefined) {
    log.warn('the workload’s address was not on this node when it was frozen', {
      migration: id,
      address: moving.address.cidr,
    });
    return;
  }
  journal.note(id, { addressDevice: device });
  await addresses.remove(moving.address, device);
  moving.device = device;
  log.info('service address withdrawn', { migration: id, address: moving.address.cidr, device });
}

/**
 * Source, rolling back: the address comes back before the process resumes,
 * is announced, and the hook is told. A failure here is logged, not thrown:
 * the process resumes either way, and the log says what to fix by hand.
 */
export async function takeBack(context: AgentContext, id: string, moving: MovingAddress, peer: string): Promise<void> {
  const { addresses, node } = context;
  const device = moving.device;
  if (device === undefined) return;
  try {
    if ((await addresses.holder(moving.address.ip)) === undefined) await addresses.add(moving.address, device);
    addresses.announce(moving.address, device);
    moving.device = undefined;
    log.info('service address back on the source', { migration: id, address: moving.address.cidr, device });
  } catch (error) {
    log.error('cannot put the workload’s address back: add it by hand', {
      migration: id,
      address: moving.address.cidr,
      device,
      error: (error as Error).message,
    });
  }
  if (moving.hook !== '') {
    await addresses
      .hook(moving.hook, 'return', { ...hookEnv(moving, id, node, peer) })
      .catch((error: unknown) =>
        log.error('the address hook failed to return the address', { migration: id, error: (error as Error).message }),
      );
  }
}

/**
 * Destination, before the restore: packets to the address are dropped
 * (so no client gets a reset before its socket is back), the address is
 * added and announced, and the hook runs. Undone if any step fails.
 */
export async function take(context: AgentContext, id: string, moving: MovingAddress, peer: string): Promise<void> {
  const { addresses, journal, node } = context;
  const problem = await addresses.problem(moving.address);
  if (problem !== '')
    throw new AddressError(`cannot take ${moving.address.cidr}: ${problem.replace(' there', ' here')}`);
  await addresses.block(id, moving.address);
  try {
    const device = await addresses.add(moving.address);
    moving.device = device;
    journal.note(id, { addressDevice: device });
    addresses.announce(moving.address, device);
    if (moving.hook !== '') await addresses.hook(moving.hook, 'take', hookEnv(moving, id, node, peer));
    log.info('service address taken', { migration: id, address: moving.address.cidr, device });
  } catch (error) {
    await giveUp(context, id, moving);
    throw error;
  }
}

/** Destination, once its copy is restored (held, not yet running): the address's packets reach the restored sockets. */
export async function openAddress(context: AgentContext, id: string): Promise<void> {
  await context.addresses.release(id);
}

/** Destination, its copy discarded: the address leaves again (the source takes it back). */
export async function giveUp(context: AgentContext, id: string, moving: MovingAddress): Promise<void> {
  const { addresses } = context;
  await addresses
    .release(id)
    .catch((error: unknown) =>
      log.warn('cannot remove the address hold', { migration: id, error: (error as Error).message }),
    );
  if (moving.device === undefined) return;
  await addresses
    .remove(moving.address, moving.device)
    .then(() => (moving.device = undefined))
    .catch((error: unknown) =>
      log.error('cannot remove the workload’s address from this node: remove it by hand', {
        migration: id,
        address: moving.address.cidr,
        error: (error as Error).message,
      }),
    );
}

/**
 * Source, after a commit: CRIU's lock table stays, since only a restore on
 * this host would remove it and the copy was restored elsewhere. Its rules
 * drop packets of connections that now live on the destination.
 */
export async function dropCriuLock(
  context: AgentContext,
  m: { id: string; pid: number; dir: string; finalRound?: string | undefined; criuLock?: boolean | undefined },
): Promise<void> {
  if (m.criuLock !== true) return;
  // Not before the process is gone: its sockets close, and the table keeps that from reaching the peers.
  for (let i = 0; i < 100 && context.processes.exists(m.pid); i++) await sleep(20);
  try {
    const runId = await context.criu.dumpRunId(join(m.dir, m.finalRound ?? 'final'));
    if (runId !== undefined) await context.addresses.dropCriuLock(runId);
  } catch (error) {
    log.warn('cannot remove CRIU’s network lock table', { migration: m.id, error: (error as Error).message });
  }
}

function hookEnv(moving: MovingAddress, id: string, node: string, peer: string) {
  return { address: moving.address.cidr, workload: moving.workload, migration: id, node, peer };
}
