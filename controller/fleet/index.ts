/**
 * Rebalancing a set of nodes: a plan of moves from the nodes' facts (a
 * pure function), its execution as ordinary live migrations, draining,
 * and the schedule that runs it on a cron expression.
 */
export {
  applyPlan,
  DEFAULT_THRESHOLD,
  nodeFacts,
  parseSelector,
  plan,
  readNodes,
  setDraining,
  type ApplyOptions,
  type LabelSelector,
  type Move,
  type MoveOutcome,
  type NodeLoad,
  type NodeRef,
  type NodeState,
  type Plan,
  type PlanOptions,
  type Stay,
  type WorkloadState,
} from './rebalance.js';
export { parseCron, runSchedule, type RunRecord, type ScheduleOptions } from './schedule.js';
