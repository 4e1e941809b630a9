import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocketServer } from 'ws';
import { WireConnection, type RequestHandler } from './connection.js';
import { WireProtocolError } from './errors.js';
import { MAX_FRAME_BYTES, PeerRole, PROTOCOL_VERSION, type ProgressMessage } from './messages.js';

export interface WireServerOptions {
  host: string;
  port: number;
  /** This side's name, sent in Welcome. */
  name: string;
  softwareVersion: string;
  /** Requests after the handshake. */
  onRequest: RequestHandler;
  onProgress?: (progress: ProgressMessage, connection: WireConnection) => void;
  onConnection?: (
    connection: WireConnection,
    peer: { role: 'controller' | 'agent'; name: string; address: string },
  ) => void;
  heartbeatMs?: number;
  deadAfterMs?: number;
}

/**
 * Accepts Ferry connections. The first request on a connection must be a
 * Hello with this protocol version; anything else is a protocol violation.
 */
export class WireServer {
  private constructor(
    readonly http: Server,
    readonly wss: WebSocketServer,
  ) {}

  static async listen(options: WireServerOptions): Promise<WireServer> {
    const http = createServer((_, res) => {
      res.writeHead(426, { 'content-type': 'text/plain' }).end('Ferry agent: WebSocket only\n');
    });
    const wss = new WebSocketServer({ server: http, maxPayload: MAX_FRAME_BYTES });
    wss.on('connection', (ws, req) => {
      let greeted = false;
      const address = req.socket.remoteAddress ?? '?';
      const connection: WireConnection = new WireConnection(ws, {
        peer: `peer ${address}`,
        heartbeatMs: options.heartbeatMs,
        deadAfterMs: options.deadAfterMs,
        onProgress: (p) => options.onProgress?.(p, connection),
        onRequest: async (envelope, conn) => {
          if (!greeted) {
            const hello = envelope.hello;
            if (!hello) throw new WireProtocolError('the first message must be hello');
            if (hello.protocolVersion !== PROTOCOL_VERSION) {
              throw new WireProtocolError(
                `protocol ${hello.protocolVersion} is not spoken here (this agent speaks ${PROTOCOL_VERSION}): upgrade the older side`,
              );
            }
            greeted = true;
            conn.peerName = hello.name ?? '';
            options.onConnection?.(conn, {
              role: hello.role === PeerRole.CONTROLLER ? 'controller' : 'agent',
              name: hello.name ?? '',
              address,
            });
            return {
              welcome: {
                protocolVersion: PROTOCOL_VERSION,
                agentName: options.name,
                softwareVersion: options.softwareVersion,
              },
            };
          }
          if (envelope.hello) throw new WireProtocolError('hello twice');
          return options.onRequest(envelope, conn);
        },
      });
    });
    await new Promise<void>((resolve, reject) => {
      http.once('error', reject);
      http.listen(options.port, options.host, () => {
        http.off('error', reject);
        resolve();
      });
    });
    return new WireServer(http, wss);
  }

  get port(): number {
    return (this.http.address() as AddressInfo).port;
  }

  async close(): Promise<void> {
    for (const client of this.wss.clients) client.terminate();
    await new Promise<void>((resolve) => this.wss.close(() => resolve()));
    await new Promise<void>((resolve) => this.http.close(() => resolve()));
  }
}
