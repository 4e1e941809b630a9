import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CriuClient, CriuSocketEndpoint, SeqpacketListener, type PacketConnection } from '../../src/criu/index.js';
import { RpcRequest, RpcResponse, type RpcRequestMessage } from '../../src/criu/rpc.js';

/** What a fake CRIU worker does with one connection. */
export type FakeWorker = (peer: FakePeer) => Promise<void>;

export interface FakePeer {
  /** The next request from the client, decoded; null when the client closed. */
  request(): Promise<RpcRequestMessage | null>;
  reply(response: Parameters<typeof RpcResponse.encode>[0]): void;
  sendRaw(bytes: Uint8Array): void;
  close(): void;
  /** Resolves when the client closes its end. */
  clientClosed(): Promise<void>;
}

/**
 * A stand-in for `criu service` on a real SEQPACKET socket, for protocol
 * edge cases that real CRIU never produces on demand (malformed responses,
 * wrong types, a worker dying mid-call). Never proof that a feature works.
 */
export class FakeCriuService {
  readonly #dir = mkdtempSync(join(tmpdir(), 'ferry-fake-criu-'));
  readonly #listener: SeqpacketListener;
  readonly #open = new Set<PacketConnection>();
  connections = 0;

  constructor(worker: FakeWorker) {
    this.#listener = SeqpacketListener.listen(join(this.#dir, 'criu.sock'), (connection) => {
      this.connections += 1;
      this.#open.add(connection);
      void worker(peerOf(connection)).finally(() => {
        connection.close();
        this.#open.delete(connection);
      });
    });
  }

  get socketPath(): string {
    return this.#listener.path;
  }

  client(): CriuClient {
    return new CriuClient(new CriuSocketEndpoint(this.socketPath));
  }

  close(): void {
    for (const c of this.#open) c.close();
    this.#listener.close();
    rmSync(this.#dir, { recursive: true, force: true });
  }
}

function peerOf(connection: PacketConnection): FakePeer {
  let pendingClose: Promise<void> | undefined;
  return {
    async request() {
      const packet = await connection.receive();
      return packet === null ? null : RpcRequest.decode(packet.data);
    },
    reply(response) {
      connection.send(RpcResponse.encode(response).finish());
    },
    sendRaw(bytes) {
      connection.send(bytes);
    },
    close() {
      connection.close();
    },
    clientClosed() {
      pendingClose ??= (async () => {
        while ((await connection.receive()) !== null) {
          // drain until the client closes
        }
      })();
      return pendingClose;
    },
  };
}
