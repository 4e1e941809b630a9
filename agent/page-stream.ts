/**
 * The page stream of a round, carried on a connection between the two
 * agents (docs/criu.md, "The page stream"). CRIU's dump is handed one end
 * of a Unix socket pair (ps.fd, in a swrk worker) instead of a TCP
 * connection of its own, and the source agent carries the other end to the
 * destination in a thread of its own (native/seqpacket.c): under
 * --plain-pages joined to the TCP connection with splice(2), so the kernel
 * moves the pages; by default through mutual TLS 1.3 with the agents'
 * certificates (OpenSSL), since CRIU's dump does no TLS on a ps.fd. The
 * destination's CRIU page server is handed the plain TCP connection
 * itself, or the end of a socket pair behind the agent's TLS (CRIU's page
 * server cannot take the TLS itself: it reads one TLS record per command).
 * Nothing of the pages passes through JavaScript.
 *
 * Why: CRIU corks its page-server socket and sends the dump's last command
 * without pushing it, so every dump to a page server waited out the
 * kernel's 200 ms cork timer. A Unix socket takes no TCP_CORK, and the page
 * server's end never corks (it turns Nagle off).
 */
import { connect as connectTcp, createServer as createTcpServer, type Server, type Socket } from 'node:net';
import { seqpacketAddon, socketDescriptor, type PageTls, type PassedFd } from '../src/criu/index.js';
import { log } from '../src/log.js';

/** One end of a round's page stream: the descriptor for CRIU, and the relay behind it. */
export interface PageStream {
  /** Marks CRIU's end as handed to a call (which closes it), and gives it. */
  handOver(): number;
  /** Ends when the relay has ended; resolves with the bytes that went from CRIU into the connection. */
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
  /** `tls`: encrypt (the server's certificate must name `address`); undefined: plain. */
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
  let end: () => void = () => undefined;
  let accept: (criu: PassedFd) => void = () => undefined;
  const connection = new Promise<PassedFd>((resolve) => (accept = resolve));
  // Paused: not a byte is read here; CRIU, or the relay thread, reads the connection.
  const server: Server = createTcpServer({ pauseOnConnect: true, noDelay: true }, (socket) => {
    server.close();
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    if (tls === undefined) {
      log.info('page connection', { peer, tls: false });
      end = () => socket.destroy();
      accept(socket);
      return;
    }
    const stream = relay(socket, { ...tls, server: true, peer: sourceHost });
    end = () => stream.close();
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
      end();
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
  return relay(remote, tls === undefined ? undefined : { ...tls, server: false, peer: address });
}

/**
 * A Unix socket pair whose first end a thread joins to `remote`'s
 * connection (TLS on the way when `tls`); the second is CRIU's. The
 * descriptors are closed only once the thread is done with them.
 */
function relay(remote: Socket, tls: (PageTls & { server: boolean; peer: string }) | undefined): PageStream {
  const native = seqpacketAddon();
  remote.on('error', () => undefined); // the relay thread reports what goes wrong
  const net = socketDescriptor(remote);
  const [ours, theirs] = native.socketpair(true);
  native.blocking(ours);
  native.blocking(net);
  // Set by close(): what the thread then reports (the shut-down connection) is the end asked for, not a failure.
  let closing = false;
  let sent: Promise<number>;
  if (tls === undefined) {
    const direction = (from: number, to: number): Promise<number> =>
      new Promise((resolve, reject) =>
        native.relay(from, to, (error, bytes) => (error === null || closing ? resolve(bytes) : reject(error))),
      );
    // CRIU's commands and pages one way; the page server's answers the other.
    sent = Promise.all([direction(ours, net), direction(net, ours)]).then(([bytes]) => bytes);
  } else {
    sent = new Promise((resolve, reject) =>
      native.tlsRelay(
        ours,
        net,
        { server: tls.server, ca: tls.cacert, cert: tls.cert, key: tls.key, peer: tls.peer },
        (error, bytes, protocol, cipher) => {
          if (error !== null && !closing) return reject(error);
          log.info('page stream ended', { peer: tls.peer, protocol, cipher, bytes });
          resolve(bytes);
        },
      ),
    );
  }
  let closed = false;
  const end = (): void => {
    if (closed) return;
    closed = true;
    remote.destroy();
    native.close(ours);
  };
  const done = sent.finally(end);
  done.catch((error: unknown) => log.warn('page relay failed', { error: (error as Error).message }));
  let handed = false;
  return {
    done,
    handOver() {
      handed = true;
      return theirs;
    },
    close() {
      // Not closed under the thread (a descriptor number could be reused meanwhile): shut down,
      // which ends it (end of file, or an error); `end` closes them after.
      if (!closed) {
        closing = true;
        for (const fd of [net, ours]) {
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
