import { PAGE_SIZE } from '../../src/units.js';
import type { DumpStatsMessage } from '../../src/wire/index.js';
import { isRetryable, localized, type AgentLink } from '../agents/index.js';
import type { MigrationContext } from './context.js';
import { OutcomeUnknownError, PostcopyFailedError } from './errors.js';
import type { MigrationReport } from './report.js';

/** What post-copy risks, said wherever post-copy is offered or reported. */
export const POSTCOPY_RISK =
  'while the destination fetches the memory, the process lives on both machines: losing the source ' +
  'or the link then kills the copy on the destination, and the source continues from the switchover, ' +
  'or is lost with the source';

/**
 * After the resume of a post-copy migration: the copy runs on the
 * destination and fetches its memory from the source, still frozen and
 * serving. Once the destination has every page, the source is told to end
 * its copy (the settled commit), and never before.
 */
export async function postcopy(
  m: MigrationContext,
  resumedPid: number,
  residentBytes: number,
): Promise<{ finalStats: DumpStatsMessage | null | undefined; report: NonNullable<MigrationReport['postcopy']> }> {
  const { source, sourceName, destinationName } = m;
  m.emit('postcopy', destinationName, `running as PID ${resumedPid}; fetching its memory from ${sourceName}`);
  m.phase = 'postcopy';
  // The memory the destination's fetch counts toward (its progress: bytes arrived, rate, time left).
  m.expectedPageBytes = residentBytes;
  const fetched = await awaitPostcopy(m);
  let finalStats: DumpStatsMessage | null | undefined;
  try {
    finalStats = (await source.call('commit', { migrationId: m.id, settled: true }, { timeoutMs: 0 })).stats;
  } catch (error) {
    throw new OutcomeUnknownError(`${sourceName} did not confirm the end of its copy: ${(error as Error).message}`, {
      hint: `every page arrived on ${destinationName}; check the source with \`ferry status --on ${sourceName}\``,
      cause: error,
    });
  }
  // CRIU 4.1 resets the dump's statistics when its lazy page server starts: the destination counts.
  const lazyPages = fetched.pages;
  return {
    finalStats,
    report: { fetchMs: fetched.ms, lazyPages, lazyBytes: lazyPages * PAGE_SIZE, risk: POSTCOPY_RISK },
  };
}

/**
 * Waits until the destination has every page (its outcome "committed"),
 * telling the operator how long it has been. A failure there means its copy
 * was killed and the source continued.
 */
async function awaitPostcopy(m: MigrationContext): Promise<{ ms: number; pages: number }> {
  const { options, sourceName, destinationName } = m;
  const started = performance.now();
  let lastSaid = started;
  let peer: AgentLink | undefined;
  try {
    for (;;) {
      try {
        peer ??= await m.connect(options.to);
        const outcome = await peer.call('outcomeQuery', { migrationId: m.id }, { timeoutMs: 30_000 });
        if (outcome.state === 'committed') {
          const ms = outcome.postcopyMs ?? Math.round(performance.now() - started);
          m.emit('postcopy', destinationName, `every page arrived from ${sourceName} in ${ms} ms`);
          return { ms, pages: Number(outcome.postcopyPages ?? 0) };
        }
        if (outcome.state === 'aborted' || outcome.state === 'unknown') {
          throw new PostcopyFailedError(
            `post-copy failed: ${outcome.detail || 'the destination has no copy'}. The copy on ${destinationName} was killed ` +
              `(its memory was incomplete); the process continues on ${sourceName} from the switchover`,
            {
              hint: `check it with \`ferry ps --on ${sourceName}\`; work it did on ${destinationName} since the switchover is lost`,
            },
          );
        }
      } catch (error) {
        if (!isRetryable(error)) throw localized(error);
        peer?.close();
        peer = undefined;
      }
      if (options.signal?.aborted === true) {
        throw new OutcomeUnknownError(`interrupted while ${destinationName} fetches its memory from ${sourceName}`, {
          hint: `the process runs on ${destinationName}; the source keeps serving until every page arrived (\`ferry status --on ${sourceName}\`)`,
        });
      }
      if (performance.now() - lastSaid > 2_000) {
        lastSaid = performance.now();
        m.emit('postcopy', 'controller', `fetching memory: ${Math.round((lastSaid - started) / 1000)} s so far`);
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  } finally {
    peer?.close();
  }
}
