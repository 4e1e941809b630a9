/**
 * Warming the memory a switchover is about to take. On a virtual machine
 * whose kernel hands free memory back to its hypervisor (free page
 * reporting: virtio-balloon under QEMU, Firecracker, Cloud Hypervisor),
 * memory touched for the first time after that faults in several times
 * slower than memory freed a moment ago. The destination's page images and
 * its restored process take fresh memory while the source is frozen, so
 * the destination faults in as much and frees it just before the freeze:
 * the kernel hands those pages out first. Measured on the lab hosts (1 GiB
 * stop-and-copy, docs/criu.md): restore 3.1-4.1 s cold, 0.8-1.7 s warm.
 */
import { existsSync, readFileSync } from 'node:fs';
import { seqpacketAddon } from '../src/criu/index.js';
import { log } from '../src/log.js';
import { meminfoBytes } from '../src/proc.js';

const REPORTING = '/sys/module/page_reporting';

/** Whether this kernel gives free memory back to a hypervisor; warming is pointless elsewhere. */
export function handsMemoryBack(): boolean {
  return existsSync(REPORTING);
}

/** What this kernel has given back to its hypervisor since it booted; undefined where it gives nothing back. */
export function handedBackBytes(): number | undefined {
  const file = `${REPORTING}/parameters/reported_kib`;
  return existsSync(file) ? Number(readFileSync(file, 'utf8').trim()) * 1024 : undefined;
}

/** What to warm of `asked`: never more than half of what is available, so warming never pushes the node into reclaim. */
export function warmSize(asked: number, availableBytes: number): number {
  return Math.max(0, Math.min(asked, Math.floor(availableBytes / 2)));
}

/**
 * Faults in and frees up to `bytes` (warmSize), for 20 s at most: what it
 * faulted in, and how long that took. Undefined when
 * there was nothing to do: FERRY_WARM=0, a kernel that keeps its free
 * memory, or nothing asked.
 */
export async function warmMemory(bytes: number): Promise<{ bytes: number; ms: number } | undefined> {
  if (bytes <= 0 || process.env.FERRY_WARM === '0' || !handsMemoryBack()) return undefined;
  const size = warmSize(bytes, meminfoBytes('MemAvailable'));
  if (size <= 0) return undefined;
  try {
    return await new Promise((resolve, reject) =>
      seqpacketAddon().warm(size, (error, ms, warmed) =>
        error === null ? resolve({ bytes: warmed, ms }) : reject(error),
      ),
    );
  } catch (error) {
    // Only slower without it: the switchover goes on.
    log.warn('could not warm memory for the switchover', { bytes: size, error: (error as Error).message });
    return undefined;
  }
}
