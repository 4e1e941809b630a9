/** The node daemon: source and destination roles of a migration, workloads, image streaming. */
export { Agent } from './agent.js';
export type { AgentOptions } from './agent.js';
export { Workloads } from './workloads.js';
