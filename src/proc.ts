import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';

/** What /proc/PID/stat says of a process: its state letter and its start time (clock ticks since boot). */
export interface ProcStat {
  state: string;
  startTime: number;
}

/** The process's /proc/PID/stat, or undefined when there is no such process. */
export function procStat(pid: number): ProcStat | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // Fields after the command name, which may itself hold spaces and parentheses.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { state: fields[0] ?? '', startTime: Number(fields[19]) };
}

/** The state letter (R, S, T for stopped, Z for zombie, ...), or undefined when gone. */
export function processState(pid: number): string | undefined {
  return procStat(pid)?.state;
}

/** The process exists and is not a zombie. */
export function isAlive(pid: number): boolean {
  const state = processState(pid);
  return state !== undefined && state !== 'Z' && state !== 'X';
}

/** A living process's start time, or undefined when it does not exist (or is a zombie): with the PID, its identity. */
export function startTime(pid: number): number | undefined {
  return isAlive(pid) ? procStat(pid)?.startTime : undefined;
}

/** The process runs in the named network namespace (one made by `ip netns add`, under /run/netns). */
export function inNetns(pid: number, netns: string): boolean {
  try {
    const inode = Number(/\[(\d+)\]/.exec(readlinkSync(`/proc/${pid}/ns/net`))?.[1]);
    return statSync(`/run/netns/${netns}`).ino === inode;
  } catch {
    return false;
  }
}

/**
 * The process of this network namespace listening on a TCP port, among those
 * whose command line holds `marker`: for daemons that do not say their PID
 * (CRIU 4.1's page server). From the kernel's socket tables: the listening
 * socket's inode, then the process holding it.
 */
export function tcpListener(port: number, marker: string): number | undefined {
  const inodes = new Set<string>();
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try {
      text = readFileSync(table, 'utf8');
    } catch {
      continue; // no IPv6 here
    }
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      // local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
      if (fields[3] === '0A' && Number.parseInt(fields[1]?.split(':')[1] ?? '', 16) === port && fields[9] !== undefined)
        inodes.add(`socket:[${fields[9]}]`);
    }
  }
  if (inodes.size === 0) return undefined;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (!readFileSync(`/proc/${entry}/cmdline`, 'utf8').includes(marker)) continue;
      for (const fd of readdirSync(`/proc/${entry}/fd`)) {
        if (inodes.has(readlinkSync(`/proc/${entry}/fd/${fd}`))) return Number(entry);
      }
    } catch {
      // gone meanwhile
    }
  }
  return undefined;
}
