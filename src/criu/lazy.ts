/**
 * What CRIU's lazy pages (post-copy) need from this kernel beyond
 * userfaultfd, which FEATURE_CHECK reports. docs/postcopy.md has the
 * evidence.
 */
import { readFileSync } from 'node:fs';

/**
 * CRIU 4.1's lazy page server tees every requested page through a pipe it
 * sizes to PIPE_MAX_SIZE pages (8 pages of 40-byte pipe buffers: 819
 * pages); the kernel rounds that to a power of two, 4 MiB. Above
 * fs.pipe-max-size that takes CAP_SYS_RESOURCE. When it is refused, CRIU
 * ignores the failure and later splices into fd -1: "page-pipe: splice: -1:
 * Bad file descriptor" at the first page request.
 */
export const LAZY_PIPE_BYTES = 4 * 1024 * 1024;

const CAP_SYS_RESOURCE = 24;

export interface LazyPipeLimits {
  /** fs.pipe-max-size, in bytes. */
  pipeMaxSize: number;
  /** Whether processes this one starts (CRIU's service) may exceed it. */
  capSysResource: boolean;
  neededBytes: number;
  ok: boolean;
}

export function lazyPipeLimits(): LazyPipeLimits {
  const pipeMaxSize = Number(readFileSync('/proc/sys/fs/pipe-max-size', 'utf8').trim());
  const effective = /^CapEff:\s*([0-9a-f]+)/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0';
  const capSysResource = ((BigInt(`0x${effective}`) >> BigInt(CAP_SYS_RESOURCE)) & 1n) === 1n;
  return {
    pipeMaxSize,
    capSysResource,
    neededBytes: LAZY_PIPE_BYTES,
    ok: capSysResource || pipeMaxSize >= LAZY_PIPE_BYTES,
  };
}
