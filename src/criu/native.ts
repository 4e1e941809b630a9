import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { projectRoot } from '../paths.js';

/** One packet as received: its bytes (null when the peer closed) and any descriptors sent with it. */
export interface RawPacket {
  data: Buffer | null;
  fds: number[];
  truncated: boolean;
}

/** The SEQPACKET addon's surface (native/seqpacket.c). */
export interface SeqpacketAddon {
  connect(path: string): number;
  listen(path: string, backlog: number): number;
  accept(fd: number): number | null;
  /** A connected pair: SOCK_STREAM when `stream`, else SOCK_SEQPACKET; the first end non-blocking. */
  socketpair(stream: boolean): [number, number];
  /** Clears O_NONBLOCK (on the open file, which a child given the descriptor shares). */
  blocking(fd: number): void;
  /** Moves bytes from one blocking descriptor to another in a thread (splice), to end of file; then shuts `to` for writing. */
  relay(from: number, to: number, callback: (error: Error | null, bytes: number) => void): void;
  /**
   * Mutual TLS 1.3 on `net` (OpenSSL; the PEM files given; `peer`: what the other end's
   * certificate must name), relaying `plain` through it in a thread until both directions end.
   */
  tlsRelay(
    plain: number,
    net: number,
    options: { server: boolean; ca: string; cert: string; key: string; peer: string },
    callback: (error: Error | null, bytes: number, protocol: string, cipher: string) => void,
  ): void;
  /**
   * Faults in `bytes` of anonymous memory and frees it, in a thread (stopping after 20 s); calls
   * back with the milliseconds it took and the bytes it faulted in.
   */
  warm(bytes: number, callback: (error: Error | null, ms: number, warmed: number) => void): void;
  send(fd: number, packet: Uint8Array): void;
  recv(fd: number): RawPacket | null;
  close(fd: number): void;
  shutdown(fd: number): void;
  watch(fd: number, callback: (error: Error | null, events: number) => void): object;
  unwatch(handle: object): void;
}

let addon: SeqpacketAddon | undefined;

export function seqpacketAddon(): SeqpacketAddon {
  if (addon !== undefined) return addon;
  const file = join(projectRoot(), 'build', 'Release', 'seqpacket.node');
  if (!existsSync(file)) {
    throw new Error(`the SEQPACKET addon is not built (${file} is missing): run 'npm run build'`);
  }
  const require = createRequire(import.meta.url);
  addon = require(file) as SeqpacketAddon;
  return addon;
}
