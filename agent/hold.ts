import { log } from '../src/log.js';

/** The one answer a hold gives: the process (or copy) it holds lives on, or it does not. */
export type Answer = 'yes' | 'no';

/** What a hold needs from its role: how to journal an answer and how to give it. */
export interface HoldSteps {
  /**
   * Writes the answer where a crash cannot lose it (the journal), before
   * anyone hears it: a crash after this line leaves a record recovery reads.
   * "Yes" is a move (committing, resuming); "no" is noted, and its final
   * state is written by release once the rollback is complete.
   */
  record(answer: Answer, why: string): void;
  /** Gives the answer to whoever holds the process (CRIU's notify, a stopped process) and finishes with it. */
  release(answer: Answer, why: string): Promise<void>;
}

export interface HoldOptions {
  /** For logs: the migration and the role. */
  migrationId: string;
  role: 'source' | 'destination';
  /** Cancels the hold's waits: the migration's signal (its abort, or the agent stopping). */
  signal: AbortSignal;
}

/**
 * A decision the agent owes while a process is held: the source's frozen
 * process (CRIU waiting at post-dump, or a post-copy source stopped after
 * its transfer) and the destination's copy (CRIU waiting at post-restore).
 *
 * It decides exactly once: the first decide() wins and every later call
 * gets that answer; journalled before it is given. Until it decides, a
 * lease bounds the wait and a lost controller can end it; what either does
 * is the role's choice (a source says "no", a destination asks its source:
 * it never runs its copy because a lease ran out). pin() is the point of
 * no return: after it no lease or lost connection can answer, only the
 * role's own word. The migration's signal, when it fires, ends the wait
 * without an answer, as a crash would (the journal stays as it was, and
 * recovery settles it).
 */
export class Hold {
  readonly #options: HoldOptions;
  readonly #steps: HoldSteps;
  #decision: Promise<Answer> | undefined;
  #answer: Answer | undefined;
  #lease: NodeJS.Timeout | undefined;
  #pinned = false;

  constructor(options: HoldOptions, steps: HoldSteps) {
    this.#options = options;
    this.#steps = steps;
    options.signal.addEventListener('abort', () => this.#clearLease(), { once: true });
  }

  /** The answer once decide() was called, else undefined. */
  get answer(): Answer | undefined {
    return this.#answer;
  }

  get pinned(): boolean {
    return this.#pinned;
  }

  /**
   * Arms (or re-arms) the lease: with no decision within ms, onEnd runs.
   * Nothing after pin() or a decision.
   */
  lease(ms: number, onEnd: () => void): void {
    this.#clearLease();
    if (this.#answer !== undefined || this.#pinned || this.#options.signal.aborted) return;
    this.#lease = setTimeout(() => {
      this.#lease = undefined;
      if (this.#answer === undefined && !this.#pinned) onEnd();
    }, ms);
  }

  /** Runs onLost if the connection ends while the hold is still open (not decided, not pinned). */
  whileConnected(connection: { onClose(listener: () => void): void }, onLost: () => void): void {
    connection.onClose(() => {
      if (this.#answer === undefined && !this.#pinned && !this.#options.signal.aborted) onLost();
    });
  }

  /**
   * The point of no return before the answer: leases and lost connections
   * no longer decide. Refused (false) once the answer was "no".
   */
  pin(): boolean {
    if (this.#answer === 'no') return false;
    this.#pinned = true;
    this.#clearLease();
    return true;
  }

  /**
   * Decides, once: records, then releases. Resolves with the answer that
   * was taken, which is an earlier call's when there was one. After pin()
   * only the role calls it (leases and lost connections no longer do).
   */
  decide(answer: Answer, why: string): Promise<Answer> {
    if (this.#decision !== undefined) return this.#decision;
    this.#answer = answer;
    this.#clearLease();
    log.info(answer === 'yes' ? 'hold released: yes' : 'hold released: no', {
      migration: this.#options.migrationId,
      role: this.#options.role,
      why,
    });
    this.#decision = (async () => {
      this.#steps.record(answer, why);
      await this.#steps.release(answer, why);
      return answer;
    })();
    // Leases and lost connections decide without waiting for the result: a release that fails
    // (CRIU gone, a directory that would not go) is logged, never an unhandled rejection
    // that ends the agent. Callers that await the decision still see the error.
    this.#decision.catch((error: unknown) =>
      log.error('a hold’s release failed', {
        migration: this.#options.migrationId,
        role: this.#options.role,
        answer,
        error: (error as Error).message,
      }),
    );
    return this.#decision;
  }

  /** The decision in progress or taken, if any. */
  get decision(): Promise<Answer> | undefined {
    return this.#decision;
  }

  #clearLease(): void {
    if (this.#lease !== undefined) clearTimeout(this.#lease);
    this.#lease = undefined;
  }
}
