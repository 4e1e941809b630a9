/**
 * The migration state machine: preflight → pre-copy rounds → switchover →
 * commit | rollback → (post-copy) → report. Each step is a file of its
 * own; migrate() below is their order, and where the commit point is.
 */
import { InvalidInputError } from '../../src/errors.js';
import { localized } from '../agents/index.js';
import { connectBoth, startRun, type MigrateOptions, type MigrationContext } from './context.js';
import { MigrationFailedError } from './errors.js';
import { postcopy } from './postcopy.js';
import { precopy, type Precopy } from './precopy.js';
import { preflight, prepareDestination, type Preflight } from './preflight.js';
import { migrationReport, type MigrationReport } from './report.js';
import { commit, resume, switchover, type Switchover } from './switchover.js';

export type { MigrateOptions, MigrationEvent, Phase, Strategy } from './context.js';
export {
  DEFAULT_COST,
  DEFAULT_LIMITS,
  decide,
  estimate,
  explain,
  floorMs,
  type Decision,
  type Estimate,
  type PolicyContext,
  type PolicyLimits,
  type RoundSample,
  type StopRule,
  type SwitchoverCost,
} from './convergence.js';
export {
  DowntimeBudgetError,
  MigrationFailedError,
  OutcomeUnknownError,
  PostcopyFailedError,
  PreflightRefusedError,
} from './errors.js';
export { POSTCOPY_RISK } from './postcopy.js';
export type { MigrationReport, RoundReport } from './report.js';

/**
 * Moves a process from one agent to another. Rollback is possible until
 * the commit request is sent to the source; after it, the only way is
 * forward (resume on the destination). That is the switchover's
 * invariant as the controller keeps it: the destination's copy is resumed
 * only after the source answered the commit, and neither agent is asked to
 * roll back once the commit was sent.
 */
export async function migrate(options: MigrateOptions): Promise<MigrationReport> {
  if (options.from.url === options.to.url) {
    throw new InvalidInputError('--from and --to name the same agent', {
      hint: 'a migration needs two different agents',
    });
  }
  if ((options.pid === undefined) === (options.workload === undefined)) {
    throw new InvalidInputError('name the process by PID or by workload name, exactly one');
  }
  const run = startRun(options);
  run.emit('preflight', 'controller', `connecting to ${options.from.url} and ${options.to.url}`);
  const m = await connectBoth(run);
  try {
    const { facts, rounds, switched, phasesMs } = await upToTheCommit(m);
    // The commit point: from here the source never resumes, and nothing is rolled back.
    const committedStats = await commit(m, facts);
    const resumedPid = await resume(m, switched, (committedStats?.memwriteTimeUs ?? 0) / 1000);
    const downtimeMs = (switched.held.frozenMs ?? 0) + (performance.now() - switched.heldAt);
    // Post-copy: the source's copy ends (the settled commit) only once the destination has every page.
    const settled =
      facts.strategy === 'postcopy'
        ? await postcopy(m, resumedPid, Number(facts.process.residentBytes ?? 0))
        : undefined;
    m.emit('done', m.destinationName, `running as PID ${resumedPid}`);
    const commitMs = m.elapsed() - phasesMs.preflight - phasesMs.precopy - phasesMs.switchover;
    return migrationReport(m, {
      preflight: facts,
      precopy: rounds,
      switchover: switched,
      finalStats: settled === undefined ? committedStats : settled.finalStats,
      resumedPid,
      downtimeMs,
      phasesMs: { ...phasesMs, commit: commitMs },
      postcopy: settled?.report,
    });
  } finally {
    m.source.close();
    m.destination.close();
  }
}

/**
 * Preflight, preparing the destination, the pre-copy rounds and the
 * switchover, up to both agents holding their side; any failure on the
 * way is rolled back. Also how long each phase took.
 */
async function upToTheCommit(m: MigrationContext): Promise<{
  facts: Preflight;
  rounds: Precopy;
  switched: Switchover;
  phasesMs: { preflight: number; precopy: number; switchover: number };
}> {
  let prepared = false;
  try {
    const facts = await preflight(m);
    const preflightMs = m.elapsed();
    await prepareDestination(m, facts);
    prepared = true;
    const rounds = await precopy(m, facts);
    const precopyMs = m.elapsed() - preflightMs;
    const switched = await switchover(m, facts, rounds.parent);
    const switchoverMs = m.elapsed() - preflightMs - precopyMs;
    return {
      facts,
      rounds,
      switched,
      phasesMs: { preflight: preflightMs, precopy: precopyMs, switchover: switchoverMs },
    };
  } catch (caught) {
    throw await rollBack(m, caught, prepared);
  }
}

/**
 * Before the commit: the source resumes (or never stopped) and the
 * destination discards its copy and images. A refusal before anything was
 * prepared is only reported: there is nothing to undo. Resolves with the
 * error to throw.
 */
async function rollBack(m: MigrationContext, caught: unknown, prepared: boolean): Promise<unknown> {
  const error = localized(caught);
  if (!prepared && error instanceof InvalidInputError) return error;
  m.emit('rollback', 'controller', `rolling back: ${(error as Error).message}`);
  const reason = (error as Error).message.slice(0, 500);
  await Promise.all([
    m.source.call('abort', { migrationId: m.id, reason }, { timeoutMs: 30_000 }).catch(() => undefined),
    m.destination.call('abort', { migrationId: m.id, reason }, { timeoutMs: 30_000 }).catch(() => undefined),
  ]);
  if (error instanceof InvalidInputError) return error;
  return new MigrationFailedError(m.phase, error, { sourceAgent: m.sourceName });
}
