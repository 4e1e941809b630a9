import type { PageTls } from '../src/criu/index.js';
import type { TestHooks } from '../src/hooks.js';
import type { Journal } from './journal.js';
import type { AgentMetrics } from './metrics.js';
import type { LocalMigration, Migrations } from './migrations.js';
import type { AddressPort } from './address.js';
import type { PageLinks } from './page-stream.js';
import type { CriuPort, Peers, Processes } from './ports.js';
import type { LearnedRates } from './rates.js';
import type { Workloads } from './workloads.js';

/** What the roles of this agent share: who it is, where its images go, and the ports to the world. */
export interface AgentContext {
  /** This node's name, in messages and progress. */
  readonly node: string;
  /** The address page servers listen on and peers reach: a numeric IP. */
  readonly advertise: string;
  /** Images, one directory per migration. */
  readonly imagesRoot: string;
  /** Workload records, the journal, kept logs of failed steps. */
  readonly dataDir: string;
  /** CRIU's TLS files for pages: the identity the agent speaks with; undefined under --insecure. */
  readonly pageTls: PageTls | undefined;
  readonly criu: CriuPort;
  readonly peers: Peers;
  readonly processes: Processes;
  /** Page connections to and from other agents (agent/page-stream.ts). */
  readonly pages: PageLinks;
  /** This node's network, for a workload's service address. */
  readonly addresses: AddressPort;
  readonly journal: Journal;
  readonly workloads: Workloads;
  readonly migrations: Migrations<LocalMigration>;
  readonly rates: LearnedRates;
  readonly metrics: AgentMetrics;
  readonly hooks: TestHooks;
  /** CRIU's network lock here: iptables where a binary exists, else nftables (ports.ts networkLock). */
  readonly networkLock: 'iptables' | 'nftables';
}

/** The page TLS to use for a request: none when the controller asked for plain pages. */
export function pageTlsFor(context: AgentContext, plainPages: boolean | null | undefined): PageTls | undefined {
  return plainPages === true ? undefined : context.pageTls;
}
