import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { InvalidInputError } from '../../src/errors.js';
import { loadIdentity, writePrivate, type Identity } from '../../src/tls/index.js';

/**
 * The controller's configuration directory: the cluster CA (ca/), the
 * controller's own identity (controller/) and the inventory of nodes.
 * FERRY_CONFIG (or --config) overrides the default under the user's
 * config home.
 */
export function configDir(): string {
  const explicit = process.env.FERRY_CONFIG;
  if (explicit !== undefined && explicit !== '') return explicit;
  return join(process.env.XDG_CONFIG_HOME ?? join(homedir(), '.config'), 'ferry');
}

export const authorityDir = (dir = configDir()): string => join(dir, 'ca');
export const controllerIdentityDir = (dir = configDir()): string => join(dir, 'controller');

/** The controller's TLS identity, with the refusal `loadIdentity` gives when `ferry init` has not run. */
export function controllerIdentity(dir = configDir()): Identity {
  return loadIdentity(controllerIdentityDir(dir));
}

/** One node as `ferry install` left it. */
export interface InventoryNode {
  name: string;
  /** How it was installed: ssh://USER@HOST[:PORT]. */
  ssh: string;
  /** Where its agent answers: wss://ADDRESS:PORT. */
  url: string;
  /** Installation directory on the node. */
  prefix: string;
  /** The installed bundle's content hash. */
  bundle: string;
  installedAt: string;
  /** Free-form labels (rebalancing uses them). */
  labels?: Record<string, string>;
}

export interface Inventory {
  version: 1;
  nodes: InventoryNode[];
}

export class InventoryError extends InvalidInputError {
  override readonly code = 'INVENTORY';
}

export const NODE_NAME = /^[a-z0-9][a-z0-9.-]{0,62}$/;

const inventoryFile = (dir: string): string => join(dir, 'inventory.json');

export function readInventory(dir = configDir()): Inventory {
  const file = inventoryFile(dir);
  if (!existsSync(file)) return { version: 1, nodes: [] };
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(file, 'utf8'));
  } catch (error) {
    throw new InventoryError(`${file} is not valid JSON`, { hint: 'fix or remove it', cause: error });
  }
  const inventory = parsed as Partial<Inventory>;
  if (inventory.version !== 1 || !Array.isArray(inventory.nodes)) {
    throw new InventoryError(`${file} is not a Ferry inventory (version 1 with a nodes list)`);
  }
  for (const node of inventory.nodes) {
    if (typeof node?.name !== 'string' || !NODE_NAME.test(node.name) || typeof node.url !== 'string') {
      throw new InventoryError(`${file} has a node without a valid name and url: ${JSON.stringify(node)}`);
    }
  }
  return inventory as Inventory;
}

function writeInventory(inventory: Inventory, dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const sorted = { ...inventory, nodes: [...inventory.nodes].sort((a, b) => a.name.localeCompare(b.name)) };
  writePrivate(inventoryFile(dir), JSON.stringify(sorted, null, 2) + '\n', 0o644);
}

/** Adds or replaces the node of that name. */
export function upsertNode(node: InventoryNode, dir = configDir()): void {
  const inventory = readInventory(dir);
  inventory.nodes = [...inventory.nodes.filter((n) => n.name !== node.name), node];
  writeInventory(inventory, dir);
}

/** Removes the node; true if it was there. */
export function removeNode(name: string, dir = configDir()): boolean {
  const inventory = readInventory(dir);
  const kept = inventory.nodes.filter((n) => n.name !== name);
  if (kept.length === inventory.nodes.length) return false;
  writeInventory({ ...inventory, nodes: kept }, dir);
  return true;
}

export function findNode(name: string, dir = configDir()): InventoryNode | undefined {
  return readInventory(dir).nodes.find((n) => n.name === name);
}
