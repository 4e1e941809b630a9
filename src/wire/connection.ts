import type { IncomingMessage } from 'node:http';
import type { TLSSocket } from 'node:tls';
import WebSocket from 'ws';
import { clientOptions, peerOf, type Identity, type Peer } from '../tls/index.js';
import { abortReason, FerryError, TimeoutError } from '../errors.js';
import { PeerGoneError, RemoteError, WireProtocolError } from './errors.js';
import {
  bodyName,
  Envelope,
  MAX_FRAME_BYTES,
  PeerRole,
  PROTOCOL_VERSION,
  type Body,
  type BodyName,
  type BodyOf,
  type EnvelopeMessage,
  type ProgressMessage,
} from './messages.js';
import { REQUESTS, requestBody, type ReplyOf, type RequestName } from './requests.js';
import { validateEnvelope } from './validate.js';

/** Requests a peer may have waiting for answers at once: the parties ask one thing at a time, progress aside. */
export const MAX_IN_FLIGHT = 64;
/** Answers queued for a peer that does not read them, before it is cut off. */
const MAX_UNREAD_BYTES = 8 * MAX_FRAME_BYTES;

/** Answers one request: return the reply body, or throw (a FerryError becomes the peer's RemoteError). */
export type RequestHandler = (envelope: EnvelopeMessage, connection: WireConnection) => Promise<Body>;

export interface WireConnectionOptions {
  /** Name of the peer, for messages ("agent a", "controller"). */
  peer: string;
  onRequest?: RequestHandler | undefined;
  onProgress?: ((progress: ProgressMessage) => void) | undefined;
  /** Ping interval; a peer that has not answered for deadAfterMs is gone. */
  heartbeatMs?: number | undefined;
  deadAfterMs?: number | undefined;
}

export interface RequestOptions {
  signal?: AbortSignal | undefined;
  /** 0: wait as long as the connection lives. */
  timeoutMs?: number | undefined;
}

interface Pending {
  resolve: (envelope: EnvelopeMessage) => void;
  reject: (error: Error) => void;
}

/**
 * One trusted WebSocket between two Ferry parties: request/response with
 * ids, progress events, heartbeats. Anything that does not decode or
 * validate gets a failure reply and closes the connection.
 */
export class WireConnection {
  readonly #ws: WebSocket;
  readonly #options: WireConnectionOptions;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #closed: PeerGoneError | undefined;
  readonly #closeListeners: ((reason: PeerGoneError) => void)[] = [];
  #heartbeat: NodeJS.Timeout | undefined;
  #lastPong = Date.now();
  #inFlight = 0;
  /** Set by the handshake: the peer's Hello (on a server) or Welcome (on a client). */
  peerName = '';
  /** Who the peer's certificate says it is; undefined on a plaintext (--insecure) connection. */
  certificate: Peer | undefined;

  constructor(ws: WebSocket, options: WireConnectionOptions) {
    this.#ws = ws;
    this.#options = options;
    ws.binaryType = 'nodebuffer';
    ws.on('message', (data, isBinary) => this.#onFrame(data as Buffer, isBinary));
    ws.on('close', (code, reason) =>
      this.#shutdown(
        new PeerGoneError(options.peer, `connection closed (${code}${reason.length ? ` ${reason.toString()}` : ''})`),
      ),
    );
    ws.on('error', (error) => this.#shutdown(new PeerGoneError(options.peer, error.message, { cause: error })));
    ws.on('pong', () => (this.#lastPong = Date.now()));
    const interval = options.heartbeatMs ?? 1_000;
    const deadAfter = options.deadAfterMs ?? 5_000;
    this.#heartbeat = setInterval(() => {
      if (Date.now() - this.#lastPong > deadAfter) {
        this.#shutdown(new PeerGoneError(options.peer, `no heartbeat for ${deadAfter} ms`));
        ws.terminate();
        return;
      }
      if (ws.readyState === WebSocket.OPEN) ws.ping();
    }, interval);
    this.#heartbeat.unref();
  }

  /**
   * Connects to an agent and introduces itself; resolves after the agent's
   * Welcome. With an identity the URL must be wss:// and the agent must
   * show a certificate of the same cluster naming an agent; without one,
   * ws:// only (plaintext is never chosen silently).
   */
  static async connect(
    url: string,
    hello: { role: 'controller' | 'agent'; name: string; softwareVersion: string },
    options: Omit<WireConnectionOptions, 'peer'> & {
      peer?: string;
      signal?: AbortSignal;
      timeoutMs?: number;
      tls?: Identity | undefined;
    } = {},
  ): Promise<WireConnection> {
    const peer = options.peer ?? url;
    const timeoutMs = options.timeoutMs ?? 5_000;
    const secure = url.startsWith('wss://');
    if (secure !== (options.tls !== undefined)) {
      throw new WireProtocolError(
        secure
          ? `${url} needs a TLS identity to connect with`
          : `${url} is plaintext but this side insists on TLS: use a wss:// URL, or --insecure for a plaintext agent`,
      );
    }
    const ws = new WebSocket(url, {
      maxPayload: MAX_FRAME_BYTES,
      handshakeTimeout: timeoutMs,
      ...(options.tls === undefined ? {} : clientOptions(options.tls)),
    });
    let certificate: Peer | undefined;
    ws.once('upgrade', (response: IncomingMessage) => {
      if (secure) certificate = peerOf(response.socket as TLSSocket);
    });
    await new Promise<void>((resolve, reject) => {
      const onAbort = (): void => {
        ws.terminate();
        reject(abortReason(options.signal as AbortSignal, `connecting to ${peer}`));
      };
      options.signal?.addEventListener('abort', onAbort, { once: true });
      ws.once('open', () => {
        options.signal?.removeEventListener('abort', onAbort);
        resolve();
      });
      ws.once('error', (error) => {
        options.signal?.removeEventListener('abort', onAbort);
        reject(new PeerGoneError(peer, `cannot connect: ${error.message}`, { cause: error }));
      });
    });
    if (secure && certificate?.role !== 'agent') {
      ws.terminate();
      throw new PeerGoneError(peer, `its certificate does not name a Ferry agent (${certificate?.role ?? 'no role'})`);
    }
    const connection = new WireConnection(ws, { ...options, peer });
    connection.certificate = certificate;
    try {
      const welcome = await connection.request(
        {
          hello: {
            protocolVersion: PROTOCOL_VERSION,
            role: hello.role === 'controller' ? PeerRole.CONTROLLER : PeerRole.AGENT,
            name: hello.name,
            softwareVersion: hello.softwareVersion,
          },
        },
        'welcome',
        { timeoutMs, signal: options.signal },
      );
      if (welcome.protocolVersion !== PROTOCOL_VERSION) {
        throw new WireProtocolError(
          `${peer} speaks protocol ${welcome.protocolVersion}, this side ${PROTOCOL_VERSION}: upgrade the older one`,
        );
      }
      connection.peerName = welcome.agentName ?? '';
    } catch (error) {
      connection.close();
      throw error;
    }
    return connection;
  }

  /** How messages name the peer: its own name once the handshake told it, else the address. */
  get #label(): string {
    return this.peerName !== '' ? this.peerName : this.#options.peer;
  }

  get closed(): boolean {
    return this.#closed !== undefined;
  }

  /** Called once when the connection ends, with why. */
  onClose(listener: (reason: PeerGoneError) => void): void {
    if (this.#closed !== undefined) listener(this.#closed);
    else this.#closeListeners.push(listener);
  }

  /**
   * Sends the request `name` with its parameters and resolves with its reply
   * (the table in requests.ts says which); a Failure reply rejects with RemoteError.
   */
  call<K extends RequestName>(name: K, params: BodyOf<K>, options: RequestOptions = {}): Promise<ReplyOf<K>> {
    return this.request(requestBody(name, params), REQUESTS[name].reply, options);
  }

  /** Sends any body and resolves with the expected reply body (call() is the typed way). */
  async request<K extends BodyName>(body: Body, expect: K, options: RequestOptions = {}): Promise<BodyOf<K>> {
    if (this.#closed !== undefined) throw this.#closed;
    const { signal } = options;
    if (signal?.aborted === true) throw abortReason(signal, `request to ${this.#label}`);
    const id = this.#nextId++;
    const reply = new Promise<EnvelopeMessage>((resolve, reject) => this.#pending.set(id, { resolve, reject }));
    const cleanups: (() => void)[] = [];
    const guarded = new Promise<EnvelopeMessage>((resolve, reject) => {
      reply.then(resolve, reject);
      if (signal !== undefined) {
        const onAbort = (): void => reject(abortReason(signal, `request to ${this.#label}`));
        signal.addEventListener('abort', onAbort, { once: true });
        cleanups.push(() => signal.removeEventListener('abort', onAbort));
      }
      const timeoutMs = options.timeoutMs ?? 60_000;
      if (timeoutMs > 0) {
        const timer = setTimeout(
          () => reject(new TimeoutError(`${this.#label} to answer ${bodyName(body) ?? 'a request'}`, timeoutMs)),
          timeoutMs,
        );
        cleanups.push(() => clearTimeout(timer));
      }
    });
    this.#send({ ...body, id });
    try {
      const envelope = await guarded;
      if (envelope.failure) {
        const f = envelope.failure;
        throw new RemoteError(
          this.#label,
          f.code || 'REMOTE',
          f.message ?? 'failed',
          f.hint || undefined,
          f.unchanged === true,
        );
      }
      const value = envelope[expect];
      if (value === undefined || value === null) {
        const got = bodyName(envelope) ?? 'nothing';
        this.#violation(new WireProtocolError(`${this.#label} answered with ${got}, expected ${expect}`));
        throw new WireProtocolError(`${this.#label} answered with ${got}, expected ${expect}`);
      }
      return value;
    } finally {
      this.#pending.delete(id);
      for (const cleanup of cleanups) cleanup();
    }
  }

  /** Sends a progress event (no answer). Dropped silently once closed: progress is best effort. */
  progress(progress: ProgressMessage): void {
    if (this.#closed === undefined) this.#send({ progress });
  }

  close(reason = 'done'): void {
    this.#shutdown(new PeerGoneError(this.#label, `closed here (${reason})`));
    if (this.#ws.readyState === WebSocket.OPEN || this.#ws.readyState === WebSocket.CONNECTING) {
      this.#ws.close(1000, reason.slice(0, 120));
      // A peer that cannot answer the closing handshake (cut network) would
      // hold the socket for ws's 30 s close timeout; a second is enough.
      const timer = setTimeout(() => this.#ws.terminate(), 1_000);
      this.#ws.once('close', () => clearTimeout(timer));
    }
  }

  /** Closes without a goodbye: what a crash looks like to the peer. */
  terminate(): void {
    this.#shutdown(new PeerGoneError(this.#label, 'terminated here'));
    this.#ws.terminate();
  }

  #send(envelope: EnvelopeMessage): void {
    if (this.#ws.readyState !== WebSocket.OPEN) return;
    this.#ws.send(Envelope.encode(envelope).finish());
  }

  #onFrame(data: Buffer, isBinary: boolean): void {
    if (this.#closed !== undefined) return;
    let envelope: EnvelopeMessage;
    try {
      if (!isBinary) throw new WireProtocolError('text frames are not part of the protocol');
      envelope = Envelope.decode(data);
      validateEnvelope(envelope);
    } catch (cause) {
      const error =
        cause instanceof WireProtocolError
          ? cause
          : new WireProtocolError(`a frame that does not decode: ${(cause as Error).message}`, { cause });
      this.#violation(error);
      return;
    }
    const replyTo = envelope.replyTo ?? 0;
    if (replyTo !== 0) {
      this.#pending.get(replyTo)?.resolve(envelope);
      return;
    }
    if (envelope.failure) {
      // A failure that answers nothing: the peer found us in violation and is
      // closing. Not waiting for it to: a peer that says so and stays would
      // hold the socket open here for as long as it likes.
      this.#shutdown(new PeerGoneError(this.#label, `closed by the peer: ${envelope.failure.message ?? ''}`));
      this.#ws.terminate();
      return;
    }
    if (envelope.progress) {
      this.#options.onProgress?.(envelope.progress);
      return;
    }
    const id = envelope.id ?? 0;
    if (id === 0) {
      this.#violation(new WireProtocolError(`a ${bodyName(envelope)} that is neither a request nor an answer`));
      return;
    }
    // Requests are answered concurrently; a peer that keeps asking without
    // waiting, or without reading the answers, would have this side hold
    // ever more of them in memory.
    if (this.#inFlight >= MAX_IN_FLIGHT) {
      this.#violation(new WireProtocolError(`more than ${MAX_IN_FLIGHT} requests in flight`));
      return;
    }
    if (this.#ws.bufferedAmount > MAX_UNREAD_BYTES) {
      this.#violation(new WireProtocolError(`over ${MAX_UNREAD_BYTES >> 20} MiB of answers left unread`));
      return;
    }
    this.#inFlight++;
    void this.#answer(id, envelope).finally(() => this.#inFlight--);
  }

  async #answer(id: number, envelope: EnvelopeMessage): Promise<void> {
    const handler = this.#options.onRequest;
    try {
      if (handler === undefined)
        throw new WireProtocolError(`${bodyName(envelope)} is not a request this side answers`);
      const body = await handler(envelope, this);
      this.#send({ ...body, replyTo: id });
    } catch (error) {
      const ferry = error instanceof FerryError ? error : undefined;
      this.#send({
        replyTo: id,
        failure: {
          code: ferry?.code ?? 'INTERNAL',
          message: error instanceof Error ? error.message : String(error),
          hint: ferry?.hint ?? '',
          unchanged: (error as { unchanged?: unknown }).unchanged === true,
        },
      });
      if (error instanceof WireProtocolError) this.close('protocol violation');
    }
  }

  /** The peer broke the protocol: tell it why, then stop trusting it. */
  #violation(error: WireProtocolError): void {
    this.#send({ failure: { code: error.code, message: error.message, hint: '', unchanged: true } });
    this.#shutdown(new PeerGoneError(this.#label, `protocol violation: ${error.message}`, { cause: error }));
    this.#ws.close(1008, 'protocol violation');
  }

  #shutdown(reason: PeerGoneError): void {
    if (this.#closed !== undefined) return;
    this.#closed = reason;
    if (this.#heartbeat !== undefined) clearInterval(this.#heartbeat);
    for (const pending of this.#pending.values()) pending.reject(reason);
    this.#pending.clear();
    for (const listener of this.#closeListeners.splice(0)) listener(reason);
  }
}
