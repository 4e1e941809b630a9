import { closeSync, rmSync } from 'node:fs';
import { abortReason } from '../errors.js';
import { seqpacketAddon, type SeqpacketAddon } from './native.js';

/** One message of a packet transport, with any file descriptors that came with it. */
export interface Packet {
  readonly data: Uint8Array;
  /** Descriptors attached with SCM_RIGHTS; whoever receives the packet owns them. */
  readonly fds: readonly number[];
}

/**
 * A connection that carries whole messages (one per packet), the way CRIU's
 * RPC needs it. `receive` resolves with the next packet, or null once the
 * peer has closed; `close` is idempotent and makes a pending `receive`
 * resolve null.
 */
export interface PacketConnection {
  send(data: Uint8Array): void;
  receive(options?: { signal?: AbortSignal | undefined }): Promise<Packet | null>;
  close(): void;
  readonly closed: boolean;
}

type Waiter = (packet: Packet | null | Error) => void;

/** A Unix SOCK_SEQPACKET connection on the libuv loop (native/seqpacket.c). */
export class SeqpacketConnection implements PacketConnection {
  readonly #native: SeqpacketAddon;
  #fd: number;
  #watch: object | undefined;
  readonly #queue: (Packet | null | Error)[] = [];
  #waiter: Waiter | undefined;
  #peerClosed = false;

  private constructor(native: SeqpacketAddon, fd: number) {
    this.#native = native;
    this.#fd = fd;
    this.#watch = native.watch(fd, (error) => this.#drain(error));
  }

  /** Connects to a listening SEQPACKET socket; throws the system error (code ENOENT, ECONNREFUSED, ...). */
  static connect(path: string): SeqpacketConnection {
    const native = seqpacketAddon();
    return new SeqpacketConnection(native, native.connect(path));
  }

  /** Wraps an accepted descriptor (see SeqpacketListener). */
  static fromDescriptor(fd: number): SeqpacketConnection {
    return new SeqpacketConnection(seqpacketAddon(), fd);
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  send(data: Uint8Array): void {
    if (this.#fd < 0) throw Object.assign(new Error('send on a closed connection'), { code: 'EPIPE' });
    this.#native.send(this.#fd, data);
  }

  receive(options: { signal?: AbortSignal | undefined } = {}): Promise<Packet | null> {
    const queued = this.#queue.shift();
    if (queued !== undefined) return settle(queued);
    if (this.#peerClosed || this.#fd < 0) return Promise.resolve(null);
    if (this.#waiter !== undefined) return Promise.reject(new Error('receive() is already pending on this connection'));
    const { signal } = options;
    if (signal?.aborted) return Promise.reject(abortReason(signal, 'receive'));
    return new Promise<Packet | null>((resolve, reject) => {
      const onAbort = (): void => {
        this.#waiter = undefined;
        reject(abortReason(signal as AbortSignal, 'receive'));
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiter = (item) => {
        signal?.removeEventListener('abort', onAbort);
        this.#waiter = undefined;
        if (item instanceof Error) reject(item);
        else resolve(item);
      };
    });
  }

  close(): void {
    if (this.#fd < 0) return;
    this.#stopWatching();
    this.#native.close(this.#fd);
    this.#fd = -1;
    // Descriptors that arrived but were never received would leak otherwise.
    for (const item of this.#queue.splice(0)) {
      if (item !== null && !(item instanceof Error)) closeAll(item.fds);
    }
    this.#deliver(null);
  }

  #stopWatching(): void {
    if (this.#watch !== undefined) {
      this.#native.unwatch(this.#watch);
      this.#watch = undefined;
    }
  }

  #drain(error: Error | null): void {
    if (this.#fd < 0) return;
    if (error !== null) {
      this.#stopWatching();
      this.#peerClosed = true;
      this.#deliver(error);
      return;
    }
    for (;;) {
      let raw;
      try {
        raw = this.#native.recv(this.#fd);
      } catch (e) {
        // ECONNRESET and friends: the peer is gone, which is what a close means here.
        this.#stopWatching();
        this.#peerClosed = true;
        this.#deliver(isPeerGone(e) ? null : (e as Error));
        return;
      }
      if (raw === null) return;
      if (raw.data === null) {
        this.#stopWatching();
        this.#peerClosed = true;
        this.#deliver(null);
        return;
      }
      this.#deliver({ data: raw.data, fds: raw.fds });
    }
  }

  #deliver(item: Packet | null | Error): void {
    if (this.#waiter !== undefined) this.#waiter(item);
    else if (item !== null || this.#queue.length === 0 || this.#queue.at(-1) !== null) this.#queue.push(item);
  }
}

/** A listening SEQPACKET socket, for services of our own (and fake CRIU services in tests). */
export class SeqpacketListener {
  readonly #native: SeqpacketAddon;
  #fd: number;
  #watch: object | undefined;

  private constructor(
    native: SeqpacketAddon,
    readonly path: string,
    onConnection: (connection: SeqpacketConnection) => void,
  ) {
    this.#native = native;
    this.#fd = native.listen(path, 64);
    this.#watch = native.watch(this.#fd, () => {
      for (;;) {
        const fd = this.#fd < 0 ? null : native.accept(this.#fd);
        if (fd === null) return;
        onConnection(SeqpacketConnection.fromDescriptor(fd));
      }
    });
  }

  static listen(path: string, onConnection: (connection: SeqpacketConnection) => void): SeqpacketListener {
    return new SeqpacketListener(seqpacketAddon(), path, onConnection);
  }

  close(): void {
    if (this.#fd < 0) return;
    if (this.#watch !== undefined) this.#native.unwatch(this.#watch);
    this.#watch = undefined;
    this.#native.close(this.#fd);
    this.#fd = -1;
    rmSync(this.path, { force: true });
  }
}

function settle(item: Packet | null | Error): Promise<Packet | null> {
  return item instanceof Error ? Promise.reject(item) : Promise.resolve(item);
}

function isPeerGone(e: unknown): boolean {
  const code = (e as { code?: unknown }).code;
  return code === 'ECONNRESET' || code === 'EPIPE' || code === 'ENOTCONN';
}

export function closeAll(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      closeSync(fd);
    } catch {
      // already closed by its new owner
    }
  }
}
