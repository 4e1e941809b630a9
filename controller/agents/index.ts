/**
 * The agents as the controller knows and reaches them: the configuration
 * (cluster CA, the controller's identity, the inventory of nodes), the
 * connection as the controller, and the requests that are not part of a
 * migration (workloads, journals).
 */
export {
  authorityDir,
  configDir,
  controllerIdentity,
  controllerIdentityDir,
  findNode,
  InventoryError,
  NODE_NAME,
  readInventory,
  removeNode,
  upsertNode,
  type Inventory,
  type InventoryNode,
} from './config.js';
export {
  AgentUnreachableError,
  connectAgent,
  isRetryable,
  localized,
  type AgentLink,
  type ConnectLink,
} from './connect.js';
export { AGENT_PORT, type AgentEndpoint } from './endpoint.js';
export { listWorkloads, migrationRecords, runWorkload } from './workloads.js';
