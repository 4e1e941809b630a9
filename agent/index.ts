/** The node daemon: the source and destination roles of a migration, workloads, image streaming, recovery. */
export { Agent } from './daemon.js';
export type { AgentOptions } from './daemon.js';
export { Workloads } from './workloads.js';
