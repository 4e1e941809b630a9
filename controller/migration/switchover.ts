import pRetry from 'p-retry';
import { formatBytes } from '../../src/units.js';
import type { BodyOf, DumpStatsMessage } from '../../src/wire/index.js';
import { isRetryable } from '../agents/index.js';
import type { MigrationContext } from './context.js';
import { OutcomeUnknownError } from './errors.js';
import type { Preflight } from './preflight.js';

/** The switchover's result: the source frozen and held, the destination's copy restored and held. */
export interface Switchover {
  held: BodyOf<'dumpHeld'>;
  /** performance.now() when the source reported the dump held. */
  heldAt: number;
  restored: BodyOf<'restored'>;
}

/**
 * The final dump, held frozen at the source with its images streamed to
 * the destination, and the destination's restore, held before the copy
 * runs. Both agents now wait for the controller's next word; either
 * settles alone (the source resumes) when it does not come in time.
 */
export async function switchover(m: MigrationContext, p: Preflight, parent: string): Promise<Switchover> {
  const { options, source, destination, sourceName, destinationName } = m;
  m.phase = 'switchover';
  const lazy = p.strategy === 'postcopy';
  // The files the workload carries, whole, while it runs: the freeze sends only what changed since.
  if (p.process.workload) {
    const carried = await source.call(
      'carryAhead',
      { migrationId: m.id, pid: p.pid, destinationUrl: options.to.url },
      { timeoutMs: 0, signal: options.signal },
    );
    m.carriedAheadBytes = Number(carried.bytes ?? 0);
  }
  // Without pre-copy rounds the final dump sends the whole memory.
  m.expectedPageBytes = parent === '' && !lazy ? Number(p.process.residentBytes ?? 0) : 0;
  const ps = lazy
    ? { address: '', port: 0, warmedBytes: 0, warmMs: 0 }
    : await destination.call('pageServerStart', {
        migrationId: m.id,
        round: 'final',
        parent,
        plainPages: m.plainPages,
        // What the freeze takes on the destination: the last pages' images, and the restored memory.
        warmBytes: m.expectedPageBytes + Number(p.process.residentBytes ?? 0),
      });
  const warmed = Number(ps.warmedBytes ?? 0);
  if (warmed > 0) {
    m.emit(
      'switchover',
      destinationName,
      `warmed ${formatBytes(warmed)} of memory for the restore in ${ps.warmMs ?? 0} ms ` +
        '(this machine hands free memory back to its hypervisor)',
    );
  }
  m.emit(
    'switchover',
    'controller',
    lazy ? 'final dump without the memory (post-copy)' : `page server ready on ${ps.address}:${ps.port}; final dump`,
  );
  const held = await source.call(
    'finalDump',
    {
      migrationId: m.id,
      round: 'final',
      parent,
      pid: p.pid,
      pageServerAddress: ps.address,
      pageServerPort: ps.port,
      destinationUrl: options.to.url,
      holdMs: m.holdMs,
      plainPages: m.plainPages,
      postcopy: lazy,
      tcpClose: options.tcpClose === true,
    },
    { timeoutMs: 0, signal: options.signal },
  );
  const heldAt = performance.now();
  await m.hooks.pause('controller.after-held');
  m.emit(
    'switchover',
    sourceName,
    lazy
      ? `source frozen; ${held.imageFiles} image files streamed; its memory is served on port ${held.postcopyPort}`
      : `source frozen and held; ${held.imageFiles} image files streamed`,
    { bytes: Number(held.imageBytes ?? 0) },
  );
  const lazyRestore = lazy
    ? {
        postcopyAddress: p.sourceFacts.address ?? '',
        postcopyPort: held.postcopyPort ?? 0,
        plainPages: m.plainPages,
      }
    : {};
  const restored = await destination.call(
    'restore',
    { migrationId: m.id, round: 'final', holdMs: m.holdMs, tcpClose: options.tcpClose === true, ...lazyRestore },
    { timeoutMs: 0, signal: options.signal },
  );
  m.emit('switchover', destinationName, `restored as PID ${restored.pid}, held before it runs`);
  await m.hooks.pause('controller.after-restored');
  return { held, heldAt, restored };
}

/**
 * The commit point. The commit is counted as sent before it is sent: from
 * here the controller never asks either agent to roll back, because the
 * source may have ended its copy whether or not its answer arrives. A
 * commit without an answer is an outcome nobody knows yet.
 */
export async function commit(m: MigrationContext, p: Preflight): Promise<DumpStatsMessage | null | undefined> {
  const { source, sourceName, destinationName } = m;
  m.phase = 'commit';
  let finalStats: DumpStatsMessage | null | undefined;
  try {
    finalStats = (await source.call('commit', { migrationId: m.id }, { timeoutMs: m.holdMs })).stats;
  } catch (error) {
    throw new OutcomeUnknownError(`the commit on ${sourceName} did not complete: ${(error as Error).message}`, {
      hint: `the process may have ended on ${sourceName}, and a copy is held on ${destinationName} for ${Math.round(m.holdMs / 1000)} s; check both with \`ferry ps\``,
      cause: error,
    });
  }
  m.emit(
    'commit',
    sourceName,
    p.strategy === 'postcopy'
      ? 'committed: the source copy stays frozen, serving memory, until the destination has all of it'
      : 'committed: the source copy has ended',
  );
  await m.hooks.pause('controller.after-commit');
  return finalStats;
}

/**
 * Starts the destination's copy, only after the source answered the
 * commit; resolves with its PID there. Safe to repeat, over a new
 * connection if the old one broke: resume acts only on a held copy.
 */
export async function resume(m: MigrationContext, s: Switchover, copyMs = 0): Promise<number> {
  const { destination, destinationName } = m;
  let resumer = destination;
  try {
    return (
      (
        await pRetry(
          async () => {
            if (resumer.closed) resumer = await m.connect(m.options.to);
            const downtimeBeforeMs = Math.round((s.held.frozenMs ?? 0) + (performance.now() - s.heldAt));
            return resumer.call(
              'resume',
              { migrationId: m.id, downtimeBeforeMs, copyMs: Math.round(copyMs) },
              { timeoutMs: m.holdMs },
            );
          },
          {
            retries: 3,
            minTimeout: 200,
            shouldRetry: isRetryable,
          },
        )
      ).pid ?? 0
    );
  } catch (error) {
    throw new OutcomeUnknownError(
      `resuming on ${destinationName} failed after the commit: ${(error as Error).message}`,
      {
        hint: `the source copy has ended and the restored copy is held on ${destinationName} for ${Math.round(m.holdMs / 1000)} s; check it with \`ferry ps --on ${destinationName}\``,
        cause: error,
      },
    );
  } finally {
    if (resumer !== destination) resumer.close();
  }
}
