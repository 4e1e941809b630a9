import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CriuDisconnectedError,
  CriuOperationError,
  CriuService,
  type CriuClient,
  type PageTls,
} from '../../src/criu/index.js';
import { createAuthority, issueIdentity, type Identity } from '../../src/tls/index.js';
import { requireRoot } from '../helpers/root.js';
import { waitFor } from '../helpers/wait.js';
import { Counter, isRunning } from '../helpers/workload.js';

let service: CriuService;
let client: CriuClient;
const scratch = mkdtempSync(join(tmpdir(), 'ferry-page-tls-'));
const counters: Counter[] = [];
let destination: Identity;
let source: Identity;
let intruder: Identity;

const pageTls = (identity: Identity): PageTls => ({
  cacert: identity.files.ca,
  cert: identity.files.cert,
  key: identity.files.key,
});

beforeAll(async () => {
  requireRoot();
  const cluster = await createAuthority(join(scratch, 'ca'), 'test');
  destination = await issueIdentity(cluster, { role: 'agent', name: 'dest', hosts: ['127.0.0.1'] }, join(scratch, 'd'));
  source = await issueIdentity(cluster, { role: 'agent', name: 'src', hosts: ['127.0.0.2'] }, join(scratch, 's'));
  const other = await createAuthority(join(scratch, 'other-ca'), 'other');
  intruder = await issueIdentity(other, { role: 'agent', name: 'src', hosts: ['127.0.0.2'] }, join(scratch, 'x'));
  service = await CriuService.start();
  client = service.client();
});

afterAll(async () => {
  for (const counter of counters) counter.cleanup([]);
  await service?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

function imagesDir(name: string): string {
  return mkdtempSync(join(scratch, `${name}-`));
}

function log(dir: string, name: string): string {
  const file = join(dir, name);
  return existsSync(file) ? readFileSync(file, 'utf8') : '';
}

async function tlsPageServer(): Promise<{ dir: string; port: number }> {
  const dir = imagesDir('pages');
  const { port } = await client.pageServer({ imagesDir: dir, address: '127.0.0.1', tls: pageTls(destination) });
  return { dir, port };
}

/** Connects as a raw TLS client and resolves with how the page server ended the session. */
function probe(port: number, identity: Identity | undefined): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect({
      host: '127.0.0.1',
      port,
      ca: destination.ca,
      servername: '',
      checkServerIdentity: () => undefined,
      ...(identity === undefined ? {} : { cert: identity.cert, key: identity.key }),
    });
    let outcome = 'open';
    socket.on('secureConnect', () => socket.write(Buffer.alloc(64)));
    socket.on('error', (error: Error) => (outcome = `error: ${error.message}`));
    socket.on('close', () => resolve(outcome === 'open' ? 'closed by the page server' : outcome));
    socket.setTimeout(10_000, () => {
      outcome = 'still open after 10 s';
      socket.destroy();
    });
  });
}

describe('CRIU page transfer over TLS', () => {
  it('a dump reaches a TLS page server through a handshake that checked both certificates', async () => {
    const counter = await Counter.start({ memoryMb: 16, hotMb: 1 });
    counters.push(counter);
    const server = await tlsPageServer();
    const images = imagesDir('dump');
    await client.dump({
      pid: counter.pid,
      imagesDir: images,
      leaveRunning: true,
      pageServer: { address: '127.0.0.1', port: server.port, tls: pageTls(source) },
    });
    expect(log(images, 'dump.log')).toContain('TLS handshake completed');
    await waitFor(() => log(server.dir, 'page-server.log').includes('TLS handshake completed'), {
      what: 'the page server to log its handshake',
    });
    expect(readdirSync(server.dir).some((f) => /^pages-\d+\.img$/.test(f))).toBe(true);
  });

  it('a page server refuses a client that shows no certificate, and writes no pages', async () => {
    const server = await tlsPageServer();
    const outcome = await probe(server.port, undefined);
    expect(outcome).not.toBe('still open after 10 s');
    await waitFor(() => /TLS handshake failed|certificate/i.test(log(server.dir, 'page-server.log')), {
      what: 'the page server to log the refusal',
    });
    expect(readdirSync(server.dir).filter((f) => f.startsWith('pages-'))).toEqual([]);
  });

  it('a page server refuses a certificate from another CA, and a dump that shows one fails with the process still running', async () => {
    const server = await tlsPageServer();
    const outcome = await probe(server.port, intruder);
    expect(outcome).not.toBe('still open after 10 s');
    await waitFor(() => /Invalid certificate|not trusted|signer/i.test(log(server.dir, 'page-server.log')), {
      what: 'the page server to log an untrusted certificate',
    });
    expect(readdirSync(server.dir).filter((f) => f.startsWith('pages-'))).toEqual([]);

    const counter = await Counter.start();
    counters.push(counter);
    const second = await tlsPageServer();
    const images = imagesDir('intruder');
    const dump = client.dump({
      pid: counter.pid,
      imagesDir: images,
      pageServer: { address: '127.0.0.1', port: second.port, tls: pageTls(intruder) },
    });
    // CRIU 4.1.1's worker dies after a failed verification instead of answering: either way, no dump.
    await expect(dump).rejects.toSatisfy((e) => e instanceof CriuOperationError || e instanceof CriuDisconnectedError);
    expect(log(images, 'dump.log')).toContain('The certificate is NOT trusted');
    expect(isRunning(counter.pid)).toBe(true);
    const count = counter.count();
    await waitFor(() => counter.count() > count, { what: 'the process to count on after the refused dump' });
    expect(readdirSync(second.dir).filter((f) => f.startsWith('pages-'))).toEqual([]);
  });
});
