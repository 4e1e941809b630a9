/**
 * The lab: hosts on this machine (a network namespace each, one bridge)
 * with an agent on each, and the demo that migrates a workload between two.
 */
export { runDemo, type DemoClient, type DemoOptions, type DemoResult } from './demo.js';
export {
  DEFAULT_LAB,
  hostEndpoint,
  LAB_NAME,
  LabError,
  labDown,
  enterHost,
  firstChild,
  killInHost,
  labExec,
  onHost,
  labUp,
  METRICS_PORT,
  readLab,
  restartAgent,
  type Lab,
  type LabHost,
  type LabUpOptions,
} from './lab.js';
