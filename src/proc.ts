import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';

/** What /proc/PID/stat says of a process: its state letter and its start time (clock ticks since boot). */
export interface ProcStat {
  state: string;
  startTime: number;
}

/** The process's /proc/PID/stat, or undefined when there is no such process. */
/** A /proc/meminfo field in bytes (0 when absent), from `text` when given (one read for several fields). */
export function meminfoBytes(key: string, text = readFileSync('/proc/meminfo', 'utf8')): number {
  return Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0) * 1024;
}

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
 * The process (other than this one or its children) that holds a socket, by its inode: how
 * a page server CRIU started on a socket it was handed is found (swrk
 * reports no PID for it, and its title does not reach its command line
 * when CRIU runs through the prefix's loader).
 */
export function socketHolder(inode: number): number | undefined {
  const link = `socket:[${inode}]`;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      // Not a child of this process: the swrk worker that started the page server holds the socket
      // too until it exits, a moment after its answer.
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === process.pid) continue;
      for (const fd of readdirSync(`/proc/${entry}/fd`)) {
        if (readlinkSync(`/proc/${entry}/fd/${fd}`) === link) return Number(entry);
      }
    } catch {
      // gone meanwhile
    }
  }
  return undefined;
}
