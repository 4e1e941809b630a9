import { FerryError } from '../src/errors.js';

/** A request that does not fit where the migration stands here (unknown, not held, already settled). */
export class MigrationStateError extends FerryError {
  readonly code = 'MIGRATION_STATE';
}

/** A request the peer's certificate does not entitle it to. */
export class NotAllowedError extends FerryError {
  readonly code = 'NOT_ALLOWED';
}

/** A step that failed here, with the logs CRIU wrote for it kept for reading. */
export class StepFailedError extends FerryError {
  readonly code: string;
  constructor(cause: unknown, kept: { from: string; to: string | undefined }) {
    const original = cause instanceof Error ? cause.message : String(cause);
    // The images directory is gone; point at the kept copy of its logs instead.
    const message = kept.to === undefined ? original : original.split(kept.from).join(kept.to);
    const hint = cause instanceof FerryError ? cause.hint : undefined;
    const where = kept.to === undefined ? undefined : `CRIU's logs of this step are kept in ${kept.to}`;
    super(message, {
      hint: [hint, where].filter((h) => h !== undefined && !h.startsWith('read ')).join('; ') || undefined,
      cause,
    });
    this.code = cause instanceof FerryError ? cause.code : 'STEP_FAILED';
  }
}

/** The agent is stopping: what its migrations were waiting for is cut off, as a crash would cut it. */
export class AgentStoppingError extends FerryError {
  readonly code = 'AGENT_STOPPING';
}

/** Marks an error as one that changed nothing (the process runs on where it was): the peer's RemoteError.unchanged. */
export function unchanged(error: unknown): unknown {
  if (error instanceof Error) Object.assign(error, { unchanged: true });
  return error;
}
