import { readdirSync, readFileSync, readlinkSync, statfsSync } from 'node:fs';
import type { ProcessFacts } from '../src/wire/index.js';
import { heldSockets } from './sockets.js';

/** What the agent can tell about a local process, for preflight; `serviceIp`: the address that moves with it. */
export function processFacts(pid: number, serviceIp?: string): ProcessFacts {
  const status = readStatus(pid);
  if (status === undefined) return { pid, exists: false };
  const ownPidNamespace = isNamespaceInit(status);
  const tree = ownPidNamespace ? processesInNamespace(pid) : [pid];
  const resident = treeResident(tree);
  let command = '';
  try {
    command = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean).join(' ').slice(0, 200);
  } catch {
    // gone meanwhile
  }
  const sockets = heldSockets(tree, serviceIp);
  const inetSockets = sockets.filter((s) => s.kind.startsWith('tcp') || s.kind === 'udp').length;
  return {
    pid,
    exists: true,
    ownPidNamespace,
    residentBytes: resident,
    command,
    inetSockets,
    sockets: sockets.map(({ kind, local, peer, state, moves, why }) => ({ kind, local, peer, state, moves, why })),
  };
}

/** The resident memory of a process and, when it is the init of its own PID namespace, of its whole tree. */
export function residentBytes(pid: number): number {
  const status = readStatus(pid);
  if (status === undefined) return 0;
  return treeResident(isNamespaceInit(status) ? processesInNamespace(pid) : [pid]);
}

/** Whether the process is the init of its own PID namespace (its innermost PID is 1). */
function isNamespaceInit(status: Map<string, string>): boolean {
  const nspid = (status.get('NSpid') ?? '').trim().split(/\s+/);
  return nspid.length > 1 && nspid.at(-1) === '1';
}

function treeResident(tree: readonly number[]): number {
  let resident = 0;
  for (const p of tree) resident += kib(readStatus(p)?.get('VmRSS')) * 1024;
  return resident;
}

/** PIDs (as seen here) that are taken on this machine, among those asked about. */
export function takenPids(pids: readonly number[]): number[] {
  return pids.filter((pid) => readStatus(pid) !== undefined);
}

export function freeBytes(dir: string): number {
  const s = statfsSync(dir);
  return s.bavail * s.bsize;
}

/** The process and, when it is the init of its own PID namespace, every process in that namespace. */
export function processTree(pid: number): number[] {
  const status = readStatus(pid);
  if (status === undefined) return [];
  return isNamespaceInit(status) ? processesInNamespace(pid) : [pid];
}

function processesInNamespace(root: number): number[] {
  let ns: string;
  try {
    ns = readlinkSync(`/proc/${root}/ns/pid`);
  } catch {
    return [root];
  }
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readlinkSync(`/proc/${entry}/ns/pid`) === ns) pids.push(Number(entry));
    } catch {
      // gone
    }
  }
  return pids.length > 0 ? pids : [root];
}

function readStatus(pid: number): Map<string, string> | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  const map = new Map<string, string>();
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon > 0) map.set(line.slice(0, colon), line.slice(colon + 1).trim());
  }
  if ((map.get('State') ?? '').startsWith('Z')) return undefined;
  return map;
}

function kib(value: string | undefined): number {
  return Number((value ?? '0').split(/\s+/)[0]) || 0;
}
