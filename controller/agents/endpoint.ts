import type { Identity } from '../../src/tls/index.js';

/** The port an agent listens on unless told otherwise (`ferry agent --listen`, the lab, `ferry install`). */
export const AGENT_PORT = 7070;

/** Where an agent answers and the identity the controller shows it (undefined: plaintext, --insecure). */
export interface AgentEndpoint {
  url: string;
  tls: Identity | undefined;
}
