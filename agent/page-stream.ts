/**
 * The page stream of a round, carried on a connection between the two
 * agents (docs/criu.md, "The page stream"). CRIU's dump is handed one end
 * of a Unix socket pair (ps.fd, in a swrk worker) instead of a TCP
 * connection of its own, and the source agent carries the other end to the
 * destination: under --plain-pages joined to a TCP connection with
 * splice(2) in a thread (the kernel moves the pages, nothing passes through
 * JavaScript); by default through mutual TLS (Node's OpenSSL, the agents'
 * certificates), because CRIU's dump does no TLS on a ps.fd. The
 * destination's CRIU page server is handed the plain TCP connection itself,
 * or the end of a socket pair behind the agent's TLS (CRIU's page server
 * cannot take the TLS itself: it reads one TLS record per command, and
 * Node's records do not follow CRIU's commands).
 *
 * Why: CRIU corks its page-server socket and sends the dump's last command
 * without pushing it, so every dump to a page server waited out the
 * kernel's 200 ms cork timer (docs/criu.md). A Unix socket takes no
 * TCP_CORK; the page server's end never corks (it turns Nagle off).
 */
import { readFileSync } from 'node:fs';
import { connect as connectTcp, createServer as createTcpServer, Socket, type Server } from 'node:net';
import { pipeline } from 'node:stream/promises';
import {
  checkServerIdentity,
  connect as connectTls,
  createServer as createTlsServer,
  type PeerCertificate,
  type TLSSocket,
} from 'node:tls';
import type { PageTls, PassedFd } from '../src/criu/index.js';
import { seqpacketAddon } from '../src/criu/native.js';
import { log } from '../src/log.js';

/** Source: what its CRIU dump writes the pages into, and the relay behind it. */
export interface PageStream {
  /** Marks CRIU's end as handed to a call (which closes it), and gives it. */
  handOver(): number;
  /** Ends when both directions of the relay have ended; resolves with the bytes sent. */
  readonly done: Promise<number>;
  /** Ends the connection; closes CRIU's end too if it was never handed over. */
  close(): void;
}

/** Destination: a port for a round's one page connection, and what CRIU's page server is then handed. */
export interface PageListener {
  readonly port: number;
  /** The plain connection (paused: not a byte read here), or CRIU's end of the pair behind the TLS. */
  readonly connection: Promise<PassedFd>;
  /** Stops listening, and ends the connection if one came. */
  close(): void;
}

/** The page connections of this node, as the roles use them (fakes in the protocol's unit tests). */
export interface PageLinks {
  /** `tls`: accept only the source (its certificate must name `sourceHost`), and decrypt; undefined: plain. */
  listen(address: string, tls: PageTls | undefined, sourceHost: string): Promise<PageListener>;
  /** `tls`: encrypt with these files (the server's certificate must name `address`); undefined: plain. */
  connect(address: string, port: number, tls: PageTls | undefined, signal: AbortSignal): Promise<PageStream>;
}

export const realPageLinks: PageLinks = {
  listen: (address, tls, sourceHost) => listenForPages(address, tls, sourceHost),
  connect: (address, port, tls, signal) => connectForPages(address, port, tls, signal),
};

/** Destination: listens on `address` (any port) for the round's one connection. */
export async function listenForPages(
  address: string,
  tls: PageTls | undefined,
  sourceHost: string,
): Promise<PageListener> {
  let close: () => void = () => undefined;
  let accept: (criu: PassedFd) => void = () => undefined;
  const connection = new Promise<PassedFd>((resolve) => (accept = resolve));
  const server: Server =
    tls === undefined
      ? // Paused: CRIU reads every byte of the connection itself.
        createTcpServer({ pauseOnConnect: true, noDelay: true }, (socket) => {
          server.close();
          log.info('page connection', { peer: `${socket.remoteAddress}:${socket.remotePort}`, tls: false });
          close = () => socket.destroy();
          accept(socket);
        })
      : createTlsServer({ ...tlsFiles(tls), requestCert: true, rejectUnauthorized: true }, (socket: TLSSocket) => {
          const peer = socket.getPeerCertificate();
          const certificate = { subject: peer.subject, subjectaltname: peer.subjectaltname } as PeerCertificate;
          if (sourceHost === '' || checkServerIdentity(sourceHost, certificate) !== undefined) {
            log.warn('a page connection from an agent that is not the source: refused', { peer: peer.subject?.CN });
            socket.destroy();
            return;
          }
          server.close();
          log.info('page connection', {
            peer: peer.subject?.CN,
            protocol: socket.getProtocol(),
            cipher: socket.getCipher().name,
          });
          const stream = relayThroughNode(socket);
          close = () => stream.close();
          accept(stream.handOver());
        });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: address, port: 0 }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (error) => log.warn('page listener failed', { error: error.message }));
  return {
    port: (server.address() as { port: number }).port,
    connection,
    close() {
      server.close();
      close();
    },
  };
}

/** Source: connects to the destination's page port; the socket pair end CRIU's dump writes into. */
export async function connectForPages(
  address: string,
  port: number,
  tls: PageTls | undefined,
  signal: AbortSignal,
): Promise<PageStream> {
  if (tls !== undefined) return connectEncrypted(address, port, tls, signal);
  const native = seqpacketAddon();
  const remote = connectTcp({ host: address, port, noDelay: true });
  // Never read here: the relay thread reads the connection.
  remote.pause();
  await new Promise<void>((resolve, reject) => {
    const abort = (): void => void remote.destroy(new Error('the migration was aborted'));
    signal.addEventListener('abort', abort, { once: true });
    remote.once('error', (error) => {
      signal.removeEventListener('abort', abort);
      reject(error);
    });
    remote.once('connect', () => {
      signal.removeEventListener('abort', abort);
      resolve();
    });
  });
  remote.on('error', () => undefined); // the relay threads report what goes wrong
  const tcp = descriptorOf(remote);
  const [ours, theirs] = native.socketpair(true);
  native.blocking(ours);
  native.blocking(tcp);
  const direction = (from: number, to: number): Promise<number> =>
    new Promise((resolve, reject) =>
      native.relay(from, to, (error, bytes) => (error === null ? resolve(bytes) : reject(error))),
    );
  // CRIU's commands and pages one way; the page server's answers the other.
  const done = Promise.all([direction(ours, tcp), direction(tcp, ours)]).then(([sent]) => sent);
  let handed = false;
  let closed = false;
  const end = (): void => {
    if (closed) return;
    closed = true;
    remote.destroy();
    native.close(ours);
  };
  // The descriptors stay open until both threads are done with them.
  done.then(end, (error: unknown) => {
    log.warn('page relay failed', { error: (error as Error).message });
    end();
  });
  return {
    done,
    handOver() {
      handed = true;
      return theirs;
    },
    close() {
      // Not closed under the threads (a descriptor number could be reused meanwhile): shut down, which
      // ends both (end of file, or an error); `end` closes them after.
      if (!closed) {
        for (const fd of [tcp, ours]) {
          try {
            native.shutdown(fd);
          } catch {
            // already ended
          }
        }
      }
      if (!handed) {
        handed = true;
        native.close(theirs);
      }
    },
  };
}

/**
 * Source, encrypted: a TLS connection (the destination's page server does
 * the other end), relayed to CRIU's socket pair through this process.
 */
async function connectEncrypted(address: string, port: number, tls: PageTls, signal: AbortSignal): Promise<PageStream> {
  const remote = connectTls({ host: address, port, ...tlsFiles(tls) });
  await new Promise<void>((resolve, reject) => {
    const abort = (): void => void remote.destroy(new Error('the migration was aborted'));
    signal.addEventListener('abort', abort, { once: true });
    remote.once('error', (error) => {
      signal.removeEventListener('abort', abort);
      reject(error);
    });
    remote.once('secureConnect', () => {
      signal.removeEventListener('abort', abort);
      resolve();
    });
  });
  remote.setNoDelay(true);
  return relayThroughNode(remote);
}

/** A Unix socket pair whose first end is relayed to `remote` through this process (TLS on the way). */
function relayThroughNode(remote: Socket): PageStream {
  remote.setNoDelay(true);
  const native = seqpacketAddon();
  const [ours, theirs] = native.socketpair(true);
  const local = new Socket({ fd: ours, readable: true, writable: true });
  let sent = 0;
  local.on('data', (chunk: Buffer) => (sent += chunk.length));
  const done = Promise.all([pipeline(local, remote), pipeline(remote, local)])
    .catch((error: unknown) => {
      // One side ends its half once the dump's last command came: not a failure.
      if ((error as { code?: string }).code !== 'ERR_STREAM_PREMATURE_CLOSE') throw error;
    })
    .then(() => sent)
    .finally(() => {
      local.destroy();
      remote.destroy();
    });
  done.catch((error: unknown) => log.warn('page relay failed', { error: (error as Error).message }));
  let handed = false;
  return {
    done,
    handOver() {
      handed = true;
      return theirs;
    },
    close() {
      local.destroy();
      remote.destroy();
      if (!handed) {
        handed = true;
        native.close(theirs);
      }
    },
  };
}

function tlsFiles(tls: PageTls): { ca: Buffer; cert: Buffer; key: Buffer } {
  return { ca: readFileSync(tls.cacert), cert: readFileSync(tls.cert), key: readFileSync(tls.key) };
}

/** The descriptor of a Node socket (its handle's; Node has no public accessor). */
function descriptorOf(socket: Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('the page connection has no descriptor');
  return fd;
}
