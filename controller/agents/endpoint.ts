import type { Identity } from '../../src/tls/index.js';

/** Where an agent answers and the identity the controller shows it (undefined: plaintext, --insecure). */
export interface AgentEndpoint {
  url: string;
  tls: Identity | undefined;
}
