import { FerryError } from '../../src/errors.js';

/** The node cannot run the agent as Ferry installs it (architecture, user, address). */
export class NodeUnsuitableError extends FerryError {
  readonly code = 'NODE_UNSUITABLE';
}

/** Restarting or removing the agent now would break something in progress there. */
export class NodeBusyError extends FerryError {
  readonly code = 'NODE_BUSY';
}

/** The agent did not answer over mutual TLS; `logTail` is the end of its log on the node. */
export class AgentNotAnsweringError extends FerryError {
  readonly code = 'AGENT_NOT_ANSWERING';
  constructor(
    readonly url: string,
    readonly logTail: string,
    options: { hint?: string; cause?: unknown } = {},
  ) {
    super(
      `the agent did not answer at ${url}${options.cause === undefined ? '' : `: ${(options.cause as Error).message}`}` +
        (logTail === '' ? '' : `; the end of its log:\n${logTail}`),
      options,
    );
  }
}
