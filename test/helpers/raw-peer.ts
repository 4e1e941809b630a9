import WebSocket from 'ws';
import { Envelope, type EnvelopeMessage } from '../../src/wire/index.js';

export interface RawPeer {
  ws: WebSocket;
  /** Every frame received, decoded. */
  frames: EnvelopeMessage[];
  /** The close code, once the connection closes. */
  closed: Promise<number>;
}

/** A raw WebSocket that speaks frames directly, to misbehave. */
export async function rawPeer(url: string, options: WebSocket.ClientOptions = {}): Promise<RawPeer> {
  const ws = new WebSocket(url, options);
  const frames: EnvelopeMessage[] = [];
  ws.on('message', (data: Buffer) => frames.push(Envelope.decode(data)));
  const closed = new Promise<number>((resolve) => ws.on('close', (code) => resolve(code)));
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  return { ws, frames, closed };
}
