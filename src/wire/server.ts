import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { WebSocketServer } from 'ws';
import { WireConnection, type RequestHandler } from './connection.js';
import { peerOf, serverOptions, type Identity, type Peer } from '../tls/index.js';
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
    peer: { role: 'controller' | 'agent'; name: string; address: string; certificate?: Peer | undefined },
  ) => void;
  /** A TLS handshake that failed: who tried and why (no certificate, another CA, expired). */
  onRefused?: (refusal: { address: string; reason: string }) => void;
  /** Mutual TLS with this identity; undefined serves plaintext (--insecure). */
  tls?: Identity | undefined;
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
    const answer = (_: IncomingMessage, res: ServerResponse): void => {
      res.writeHead(426, { 'content-type': 'text/plain' }).end('Ferry agent: WebSocket only\n');
    };
    // With TLS, a peer without a valid certificate of the cluster CA is cut
    // off right after the handshake, before a byte of HTTP is read. The check
    // is ours rather than Node's rejectUnauthorized, which destroys the socket
    // without saying why (an expired certificate would log as "socket hang up").
    const http =
      options.tls === undefined
        ? createServer(answer)
        : createTlsServer({ ...serverOptions(options.tls), rejectUnauthorized: false }, answer);
    http.on('tlsClientError', (error: Error, socket: TLSSocket) => {
      options.onRefused?.({ address: socket.remoteAddress ?? '?', reason: error.message });
    });
    http.on('secureConnection', (socket: TLSSocket) => {
      if (socket.authorized) return;
      const code = String(socket.authorizationError ?? 'not authorized');
      options.onRefused?.({ address: socket.remoteAddress ?? '?', reason: certificateProblem(code) });
      socket.destroy();
    });
    const wss = new WebSocketServer({ server: http, maxPayload: MAX_FRAME_BYTES });
    wss.on('connection', (ws, req) => {
      let greeted = false;
      const address = req.socket.remoteAddress ?? '?';
      const tlsSocket = options.tls === undefined ? undefined : (req.socket as TLSSocket);
      if (tlsSocket !== undefined && !tlsSocket.authorized) {
        ws.terminate(); // secureConnection has destroyed it already; the last line of defence
        return;
      }
      const certificate = tlsSocket === undefined ? undefined : peerOf(tlsSocket);
      if (options.tls !== undefined && certificate === undefined) {
        options.onRefused?.({ address, reason: 'its certificate names no Ferry role' });
        ws.close(1008, 'certificate names no Ferry role');
        return;
      }
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
            const role = hello.role === PeerRole.CONTROLLER ? 'controller' : 'agent';
            if (certificate !== undefined && certificate.role !== role) {
              throw new WireProtocolError(`says it is a ${role} but its certificate says ${certificate.role}`);
            }
            greeted = true;
            conn.peerName = hello.name ?? '';
            conn.certificate = certificate;
            options.onConnection?.(conn, { role, name: hello.name ?? '', address, certificate });
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

/** OpenSSL's verification codes, in words a person can act on. */
function certificateProblem(code: string): string {
  const words: Record<string, string> = {
    CERT_HAS_EXPIRED: 'its certificate has expired',
    CERT_NOT_YET_VALID: 'its certificate is not valid yet',
    UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'its certificate is from another CA',
    UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'its certificate is from another CA',
    DEPTH_ZERO_SELF_SIGNED_CERT: 'its certificate is self-signed',
  };
  return `${words[code] ?? 'its certificate was not accepted'} (${code})`;
}
