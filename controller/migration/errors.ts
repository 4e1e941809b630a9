import { FerryError, InvalidInputError, type FerryErrorOptions } from '../../src/errors.js';
import type { Phase } from './context.js';

/** A migration that failed with the source process still running where it was. */
export class MigrationFailedError extends FerryError {
  readonly code: string;
  constructor(
    readonly phase: Phase,
    cause: unknown,
    options: FerryErrorOptions & { sourceAgent: string },
  ) {
    const why = cause instanceof Error ? cause.message : String(cause);
    super(`migration failed during ${phase}: ${why}. The process still runs on ${options.sourceAgent}, unchanged.`, {
      hint: options.hint ?? (cause instanceof FerryError ? cause.hint : undefined),
      cause,
    });
    this.code = cause instanceof FerryError ? cause.code : 'MIGRATION_FAILED';
  }
}

/** Something failed after the commit point or while settling it: a person has to look (ferry ps on both agents). */
export class OutcomeUnknownError extends FerryError {
  readonly code = 'OUTCOME_UNKNOWN';
}

/** The destination cannot take the process; found before touching it. */
export class PreflightRefusedError extends InvalidInputError {
  override readonly code = 'PREFLIGHT_REFUSED';
}

/**
 * Post-copy ended without every page on the destination: its copy was
 * killed (its memory had holes), and the source continued from the
 * switchover.
 */
export class PostcopyFailedError extends FerryError {
  readonly code = 'POSTCOPY_FAILED';
}

/** --strict-downtime refused to go over the budget: the process still runs on the source. */
export class DowntimeBudgetError extends FerryError {
  readonly code = 'DOWNTIME_BUDGET';
}
