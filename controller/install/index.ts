/**
 * Installing the agent on nodes over SSH (`ferry install`, `ferry
 * uninstall`): the bundle, the node's certificate, its service, and the
 * inventory entry; every step idempotent and refused while a migration is
 * in flight there.
 */
export { AgentNotAnsweringError, NodeBusyError, NodeUnsuitableError } from './errors.js';
export { install, type InstallOptions } from './install.js';
export { DEFAULT_PREFIX, listenUrlOf, supervisorScript, systemdUnit } from './layout.js';
export {
  defaultKnownHosts,
  KnownHosts,
  parseTarget,
  readIdentity,
  sh,
  SshError,
  SshSession,
  type ExecResult,
  type HostKeyVerdict,
  type SshOptions,
  type SshTarget,
} from './ssh.js';
export type { NodeResult, TaskState } from './tasks.js';
export { uninstall, type UninstallOptions } from './uninstall.js';
