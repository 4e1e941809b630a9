import { appendFileSync, mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { Cron } from 'croner';
import { InvalidInputError } from '../../src/errors.js';
import { log } from '../../src/log.js';
import { NO_TEST_HOOKS, type TestHooks } from '../../src/hooks.js';
import { applyPlan, plan, readNodes, type NodeRef, type PlanOptions } from './rebalance.js';

export interface ScheduleOptions {
  cron: string;
  nodes: readonly NodeRef[];
  plan: PlanOptions;
  dryRun: boolean;
  /** After this many failed moves in a row (across runs), stop applying: plan only, and say so. */
  maxFailures: number;
  /** JSON lines, one per run. */
  historyFile: string;
  softwareVersion: string;
  signal: AbortSignal;
  onRun?: (run: RunRecord) => void;
  /** Where a test may pause a run (and its migrations); default none. */
  hooks?: TestHooks | undefined;
}

export interface RunRecord {
  run: number;
  startedAt: string;
  finishedAt: string;
  mode: 'apply' | 'dry-run' | 'stopped';
  planned: number;
  moved: number;
  failed: number;
  skipped: number;
  outcome: 'ok' | 'failed' | 'error';
  detail: string;
}

export function parseCron(expression: string): void {
  try {
    new Cron(expression, { paused: true }).stop();
  } catch (error) {
    throw new InvalidInputError(`${JSON.stringify(expression)} is not a cron expression: ${(error as Error).message}`, {
      hint: 'five fields (minute hour day month weekday), or six with seconds first: "*/10 * * * *"',
    });
  }
}

/**
 * `ferry schedule`: rebalancing on a cron expression until SIGTERM. A run
 * never starts while the previous one is still going (croner's protect);
 * each run reads the nodes afresh, plans, and applies unless dry-run or
 * stopped by the failure limit. Every run is appended to the history.
 */
export async function runSchedule(options: ScheduleOptions): Promise<void> {
  const hooks = options.hooks ?? NO_TEST_HOOKS;
  let runs = 0;
  let failedInARow = 0;
  let stopped = false;
  mkdirSync(dirname(options.historyFile), { recursive: true });
  const once = async (): Promise<void> => {
    const run = ++runs;
    const startedAt = new Date().toISOString();
    const mode: RunRecord['mode'] = stopped ? 'stopped' : options.dryRun ? 'dry-run' : 'apply';
    let record: Omit<RunRecord, 'finishedAt'>;
    try {
      await hooks.pause('schedule.run');
      const nodes = await readNodes(options.nodes, options.softwareVersion);
      const p = plan(nodes, options.plan);
      if (mode !== 'apply' || p.moves.length === 0) {
        record = {
          run,
          startedAt,
          mode,
          planned: p.moves.length,
          moved: 0,
          failed: 0,
          skipped: 0,
          outcome: 'ok',
          detail:
            p.moves.length === 0
              ? 'balanced: nothing to move'
              : p.moves.map((m) => `${m.workload} ${m.from}→${m.to}`).join(', ') +
                (mode === 'stopped' ? ' (not applied: stopped after failures)' : ' (dry run)'),
        };
      } else {
        const outcomes = await applyPlan(p, options.nodes, {
          softwareVersion: options.softwareVersion,
          maxConsecutiveFailures: Math.max(1, options.maxFailures - failedInARow),
          signal: options.signal,
          hooks,
        });
        for (const o of outcomes) {
          if (o.status === 'moved') failedInARow = 0;
          if (o.status === 'failed') failedInARow++;
        }
        const count = (status: string): number => outcomes.filter((o) => o.status === status).length;
        if (failedInARow >= options.maxFailures) {
          stopped = true;
          log.error('stopped applying moves', {
            failedInARow,
            hint: 'fix the failing moves, then restart `ferry schedule`; until then runs only plan',
          });
        }
        record = {
          run,
          startedAt,
          mode,
          planned: p.moves.length,
          moved: count('moved'),
          failed: count('failed'),
          skipped: count('skipped'),
          outcome: count('failed') > 0 ? 'failed' : 'ok',
          detail: outcomes.map((o) => `${o.move.workload} ${o.move.from}→${o.move.to}: ${o.status}`).join(', '),
        };
      }
    } catch (error) {
      record = {
        run,
        startedAt,
        mode,
        planned: 0,
        moved: 0,
        failed: 0,
        skipped: 0,
        outcome: 'error',
        detail: (error as Error).message,
      };
    }
    const full: RunRecord = { ...record, finishedAt: new Date().toISOString() };
    appendFileSync(options.historyFile, JSON.stringify(full) + '\n');
    options.onRun?.(full);
  };
  let current: Promise<void> | undefined;
  const job = new Cron(
    options.cron,
    {
      protect: () => log.warn('schedule: skipped a tick, the previous run is still going'),
      catch: (error: unknown) => log.error('schedule: a run failed', { error: String(error) }),
    },
    () => {
      current = once();
      return current;
    },
  );
  log.info('schedule started', { cron: options.cron, next: job.nextRun()?.toISOString(), dryRun: options.dryRun });
  await new Promise<void>((resolve) => {
    if (options.signal.aborted) resolve();
    else options.signal.addEventListener('abort', () => resolve(), { once: true });
  });
  job.stop();
  await current;
}
