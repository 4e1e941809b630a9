import { afterEach, describe, expect, it } from 'vitest';
import { AbortedError, TimeoutError } from '../../src/errors.js';
import {
  CriuDisconnectedError,
  CriuOperationError,
  CriuProtocolError,
  CriuServiceUnavailableError,
  CriuUnsupportedError,
  CriuClient,
  CriuSocketEndpoint,
} from '../../src/criu/index.js';
import { RequestType } from '../../src/criu/rpc.js';
import { FakeCriuService, type FakeWorker } from '../helpers/fake-criu.js';
import { sleep } from '../helpers/wait.js';

const versionReply = {
  type: RequestType.VERSION,
  success: true,
  version: { majorNumber: 4, minorNumber: 1, sublevel: 1 },
};

/** A worker that answers VERSION correctly, for "the client keeps working" checks. */
const honest: FakeWorker = async (peer) => {
  const req = await peer.request();
  if (req?.type === RequestType.VERSION) peer.reply(versionReply);
};

let fake: FakeCriuService | undefined;
afterEach(() => fake?.close());

/** A fake whose first connection gets `first` and every later one an honest VERSION answer. */
function fakeWithFirst(first: FakeWorker): FakeCriuService {
  let n = 0;
  fake = new FakeCriuService((peer) => (n++ === 0 ? first(peer) : honest(peer)));
  return fake;
}

describe('CRIU client against a misbehaving service', () => {
  it('reports a response that does not decode as a protocol error, then keeps working', async () => {
    const client = fakeWithFirst(async (peer) => {
      await peer.request();
      peer.sendRaw(Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]));
    }).client();
    const error = await client.version().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(CriuProtocolError);
    expect((error as CriuProtocolError).message).toMatch(/VERSION that does not decode/);
    expect((await client.version()).text).toBe('4.1.1');
  });

  it('reports a response missing required fields as a protocol error', async () => {
    const client = fakeWithFirst(async (peer) => {
      await peer.request();
      peer.sendRaw(new Uint8Array(0 + 2).fill(0x08, 0, 1)); // field 1 (type) = 0, no success
    }).client();
    await expect(client.version()).rejects.toBeInstanceOf(CriuProtocolError);
  });

  it('reports a response of the wrong type as a protocol error', async () => {
    const client = fakeWithFirst(async (peer) => {
      await peer.request();
      peer.reply({ type: RequestType.DUMP, success: true });
    }).client();
    const error = await client.version().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(CriuProtocolError);
    expect((error as Error).message).toBe('CRIU answered VERSION with a DUMP response');
    expect((await client.version()).major).toBe(4);
  });

  it('reports a worker that closes mid-call as disconnected', async () => {
    const client = fakeWithFirst(async (peer) => {
      await peer.request();
      peer.close();
    }).client();
    const error = await client.featureCheck().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(CriuDisconnectedError);
    expect((error as CriuDisconnectedError).request).toBe('FEATURE_CHECK');
    expect((await client.version()).major).toBe(4);
  });

  it('carries cr_errno and cr_errmsg of a failed request', async () => {
    const client = fakeWithFirst(async (peer) => {
      await peer.request();
      peer.reply({ type: RequestType.VERSION, success: false, crErrno: 13, crErrmsg: 'Permission denied' });
    }).client();
    const error = (await client.version().catch((e: unknown) => e)) as CriuOperationError;
    expect(error).toBeInstanceOf(CriuOperationError);
    expect(error.code).toBe('CRIU_FAILED');
    expect(error.crErrno).toBe(13);
    expect(error.crErrmsg).toBe('Permission denied');
    expect(error.message).toBe('CRIU VERSION failed: Permission denied (errno 13)');
  });

  it('times out a worker that never answers, saying what it waited for, and closes the connection', async () => {
    let closed: Promise<void> | undefined;
    const client = fakeWithFirst(async (peer) => {
      await peer.request();
      closed = peer.clientClosed();
      await closed;
    }).client();
    const error = (await client.version({ timeoutMs: 200 }).catch((e: unknown) => e)) as TimeoutError;
    expect(error).toBeInstanceOf(TimeoutError);
    expect(error.message).toBe("timed out after 200 ms waiting for CRIU's answer to VERSION");
    await closed;
    expect((await client.version()).major).toBe(4);
  });

  it('cancels a call through its AbortSignal and closes the connection', async () => {
    let sawClose = false;
    const client = fakeWithFirst(async (peer) => {
      await peer.request();
      await peer.clientClosed();
      sawClose = true;
    }).client();
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 50);
    await expect(client.version({ signal: controller.signal })).rejects.toBeInstanceOf(AbortedError);
    await expect.poll(() => sawClose).toBe(true);
  });

  it('refuses a call whose signal is already aborted without connecting', async () => {
    const f = fakeWithFirst(honest);
    const controller = new AbortController();
    controller.abort();
    await expect(f.client().version({ signal: controller.signal })).rejects.toBeInstanceOf(AbortedError);
    expect(f.connections).toBe(0);
  });

  it('reports a socket nobody listens on as service unavailable', async () => {
    const client = new CriuClient(new CriuSocketEndpoint('/nonexistent/criu.sock'));
    const error = (await client.version().catch((e: unknown) => e)) as CriuServiceUnavailableError;
    expect(error).toBeInstanceOf(CriuServiceUnavailableError);
    expect(error.retryable).toBe(true);
    expect(error.message).toMatch(
      /cannot connect to the CRIU service at \/nonexistent\/criu.sock: connect: No such file/,
    );
  });
});

describe('NOTIFY callbacks', () => {
  /** Plays a DUMP worker: sends the given notifications, records each answer, then answers the dump. */
  function dumpWorker(scripts: string[], answers: (boolean | null)[]): FakeWorker {
    return async (peer) => {
      const req = await peer.request();
      if (req?.type !== RequestType.DUMP) return;
      for (const script of scripts) {
        peer.reply({ type: RequestType.NOTIFY, success: true, notify: { script } });
        const answer = await peer.request();
        answers.push(answer === null ? null : answer.notifySuccess === true);
        if (answer === null) return;
        if (answer.notifySuccess !== true) {
          peer.reply({ type: RequestType.DUMP, success: false, crErrmsg: 'aborted by notify' });
          return;
        }
      }
      peer.reply({ type: RequestType.DUMP, success: true });
    };
  }

  it('holds an answer until the caller decides, and sends what it decided', async () => {
    const answers: (boolean | null)[] = [];
    const client = fakeWithFirst(dumpWorker(['pre-dump', 'post-dump'], answers)).client();
    let release: ((go: boolean) => void) | undefined;
    const seen: string[] = [];
    const dump = client.dump({
      pid: process.pid,
      imagesDir: '/tmp',
      onNotify: (event) => {
        seen.push(event.script);
        if (event.script !== 'post-dump') return true;
        return new Promise<boolean>((resolve) => (release = resolve));
      },
    });
    await expect.poll(() => release !== undefined).toBe(true);
    await sleep(100);
    expect(answers).toEqual([true]); // post-dump not answered while held
    release?.(false);
    await expect(dump).rejects.toBeInstanceOf(CriuOperationError);
    expect(seen).toEqual(['pre-dump', 'post-dump']);
    expect(answers).toEqual([true, false]);
  });

  it('closes the connection when the caller cancels during a held notification', async () => {
    const answers: (boolean | null)[] = [];
    const client = fakeWithFirst(dumpWorker(['post-dump'], answers)).client();
    const controller = new AbortController();
    const dump = client.dump({
      pid: process.pid,
      imagesDir: '/tmp',
      signal: controller.signal,
      onNotify: () => new Promise<boolean>(() => undefined),
    });
    setTimeout(() => controller.abort(), 50);
    await expect(dump).rejects.toBeInstanceOf(AbortedError);
    await expect.poll(() => answers).toEqual([null]);
  });

  it('fails the call with the handler’s own error when the handler throws', async () => {
    const answers: (boolean | null)[] = [];
    const client = fakeWithFirst(dumpWorker(['pre-dump'], answers)).client();
    const dump = client.dump({
      pid: process.pid,
      imagesDir: '/tmp',
      onNotify: () => {
        throw new Error('handler broke');
      },
    });
    await expect(dump).rejects.toThrow('handler broke');
    await expect.poll(() => answers).toEqual([null]);
  });
});

describe('pre-dump without memory tracking', () => {
  it('is refused before any PRE_DUMP reaches CRIU', async () => {
    const requests: number[] = [];
    fake = new FakeCriuService(async (peer) => {
      const req = await peer.request();
      if (req === null) return;
      requests.push(req.type);
      if (req.type === RequestType.FEATURE_CHECK) {
        peer.reply({ type: RequestType.FEATURE_CHECK, success: true, features: { memTrack: false, lazyPages: true } });
      }
    });
    const error = (await fake
      .client()
      .preDump({ pid: process.pid, imagesDir: '/tmp' })
      .catch((e: unknown) => e)) as CriuUnsupportedError;
    expect(error).toBeInstanceOf(CriuUnsupportedError);
    expect(error.feature).toBe('mem_track');
    expect(error.hint).toMatch(/stop-and-copy/);
    expect(requests).toEqual([RequestType.FEATURE_CHECK]);
  });
});
