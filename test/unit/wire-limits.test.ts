import { afterEach, describe, expect, it } from 'vitest';
import { rawPeer, type RawPeer } from '../helpers/raw-peer.js';
import { Envelope, PROTOCOL_VERSION, WireConnection, WireServer } from '../../src/wire/index.js';

let server: WireServer | undefined;
afterEach(async () => {
  await server?.close();
  server = undefined;
});

async function start(onRequest: Parameters<typeof WireServer.listen>[0]['onRequest']): Promise<string> {
  server = await WireServer.listen({ host: '127.0.0.1', port: 0, name: 'limits', softwareVersion: '0', onRequest });
  return `ws://127.0.0.1:${server.port}`;
}

/** A raw peer that speaks frames directly, to misbehave, after a hello. */
async function raw(url: string): Promise<RawPeer> {
  const peer = await rawPeer(url, { maxPayload: 4 * 1024 * 1024 });
  peer.ws.send(Envelope.encode({ id: 1, hello: { protocolVersion: PROTOCOL_VERSION, role: 1, name: 'raw' } }).finish());
  return peer;
}

const request = (id: number): Uint8Array => Envelope.encode({ id, listWorkloads: {} }).finish();

describe('a connection under a peer that asks more than it should', () => {
  it('closes when a peer keeps more than 64 requests waiting, and keeps serving others', async () => {
    let waiting = 0;
    const url = await start((e) => {
      if (e.statusQuery) return Promise.resolve({ migrationList: {} });
      waiting++;
      return new Promise(() => undefined);
    });
    const { ws, frames, closed } = await raw(url);
    for (let id = 2; id < 2 + 65; id++) ws.send(request(id));
    expect(await closed).toBe(1008);
    expect(waiting).toBe(64);
    expect(frames.at(-1)?.failure?.message).toBe('more than 64 requests in flight');

    const polite = await WireConnection.connect(url, { role: 'controller', name: 'polite', softwareVersion: '0' });
    await expect(polite.request({ statusQuery: {} }, 'migrationList')).resolves.toBeDefined();
    polite.close();
  });

  it('answers a peer that waits for each answer as long as it likes', async () => {
    const url = await start(() => Promise.resolve({ ack: {} }));
    const c = await WireConnection.connect(url, { role: 'controller', name: 'patient', softwareVersion: '0' });
    for (let i = 0; i < 500; i++) await c.request({ listWorkloads: {} }, 'ack');
    expect(c.closed).toBe(false);
    c.close();
  });

  it('cuts off a peer that asks without reading the answers, instead of queueing them without end', async () => {
    // Answers of about 1 MiB each; the peer stops reading its socket.
    const big = {
      workloadList: { workloads: [{ name: 'w', argv: Array.from({ length: 256 }, () => 'x'.repeat(4000)) }] },
    };
    let answered = 0;
    const url = await start(() => {
      answered++;
      return Promise.resolve(big);
    });
    const { ws, frames, closed } = await raw(url);
    ws.pause();
    for (let id = 2; id < 2 + 200; id++) {
      ws.send(request(id));
      // One at a time, so the limit on requests in flight is not what stops it.
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    ws.resume();
    expect(await closed).toBe(1008);
    expect(frames.at(-1)?.failure?.message).toMatch(/of answers left unread/);
    expect(answered).toBeLessThan(200);
  });
});

describe('a peer that says it is closing', () => {
  it('is cut off at once when it sends a failure that answers nothing, and does not hold the socket', async () => {
    const url = await start(() => Promise.resolve({ ack: {} }));
    const { ws, frames, closed } = await raw(url);
    ws.send(Envelope.encode({ failure: { code: 'X', message: 'going away, or so it says' } }).finish());
    ws.send(request(2));
    expect(await closed).toBe(1006);
    expect(frames.some((f) => f.replyTo === 2)).toBe(false);
  });
});
