import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectForPages, listenForPages } from '../../agent/page-stream.js';
import { CriuService, type CriuClient, type PageTls } from '../../src/criu/index.js';
import { createAuthority, issueIdentity, type Identity } from '../../src/tls/index.js';
import { requireRoot } from '../helpers/root.js';
import { waitFor } from '../helpers/wait.js';
import { Counter, isRunning } from '../helpers/workload.js';

/**
 * The agents' page stream (agent/page-stream.ts) with real CRIU: a dump in
 * a swrk worker writes into a Unix socket pair, the source side relays it
 * (splice, or TLS 1.3 in a thread) to the destination side, whose CRIU page
 * server is handed the connection or the pair behind its TLS. The restore
 * from what arrived proves the pages whole; the refusals prove that only
 * the migration's source gets its pages in.
 */
let service: CriuService;
let client: CriuClient;
const scratch = mkdtempSync(join(tmpdir(), 'ferry-page-stream-'));
const counters: Counter[] = [];
let destination: Identity;
let source: Identity;
let other: Identity;
let intruder: Identity;

const tls = (identity: Identity): PageTls => ({
  cacert: identity.files.ca,
  cert: identity.files.cert,
  key: identity.files.key,
});

beforeAll(async () => {
  requireRoot();
  const cluster = await createAuthority(join(scratch, 'ca'), 'test');
  destination = await issueIdentity(cluster, { role: 'agent', name: 'dest', hosts: ['127.0.0.1'] }, join(scratch, 'd'));
  source = await issueIdentity(cluster, { role: 'agent', name: 'src', hosts: ['127.0.0.2'] }, join(scratch, 's'));
  other = await issueIdentity(cluster, { role: 'agent', name: 'other', hosts: ['127.0.0.3'] }, join(scratch, 'o'));
  const foreign = await createAuthority(join(scratch, 'foreign-ca'), 'foreign');
  intruder = await issueIdentity(foreign, { role: 'agent', name: 'src', hosts: ['127.0.0.2'] }, join(scratch, 'x'));
  service = await CriuService.start();
  client = service.client();
});

afterAll(async () => {
  for (const counter of counters) counter.cleanup([]);
  await service?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

function pageBytes(dir: string): number {
  return readdirSync(dir)
    .filter((f) => /^pages-\d+\.img$/.test(f))
    .reduce((n, f) => n + statSync(join(dir, f)).size, 0);
}

function log(dir: string, name: string): string {
  const file = join(dir, name);
  return existsSync(file) ? readFileSync(file, 'utf8') : '';
}

/**
 * Dumps a counter (left running) through a page stream; `as` is the
 * certificate the source side shows (none: plain). Resolves with the page
 * server's directory and the dump's outcome.
 */
async function dumpThrough(name: string, as: Identity | undefined, counter: Counter) {
  const pages = mkdtempSync(join(scratch, `${name}-pages-`));
  const images = mkdtempSync(join(scratch, `${name}-dump-`));
  const listener = await listenForPages('127.0.0.1', as === undefined ? undefined : tls(destination), '127.0.0.2');
  const server = listener.connection.then((socket) =>
    client.pageServer({ imagesDir: pages, address: '127.0.0.1', socket }),
  );
  const stream = await connectForPages(
    '127.0.0.1',
    listener.port,
    as === undefined ? undefined : tls(as),
    AbortSignal.timeout(60_000),
  );
  const dumped = client
    .dump({ pid: counter.pid, imagesDir: images, leaveRunning: true, pageServer: { socket: stream.handOver() } })
    .then(
      () => 'dumped',
      (error: unknown) => `failed: ${(error as Error).message}`,
    );
  const outcome = await dumped;
  stream.close();
  listener.close();
  await server.catch(() => undefined);
  return { pages, images, outcome, sent: await stream.done.catch(() => -1) };
}

describe('the page stream between agents', () => {
  for (const mode of ['TLS', 'plain'] as const) {
    it(`carries a dump whole (${mode}): every page arrives, and the pages restore the process`, async () => {
      const counter = await Counter.start({ memoryMb: 32, hotMb: 1 });
      counters.push(counter);
      const { pages, images, outcome, sent } = await dumpThrough(mode, mode === 'TLS' ? source : undefined, counter);
      expect(outcome).toBe('dumped');
      // The page server wrote what the dump sent, at least the 32 MiB the counter filled.
      await waitFor(() => pageBytes(pages) >= 32 * 1024 * 1024, { what: 'the page server to write the pages' });
      expect(sent).toBeGreaterThan(32 * 1024 * 1024);
      expect(log(images, 'dump.log')).toContain('Reusing ps socket');
      // The images the dump wrote here and the pages that arrived there restore the process: the
      // counter (killed first, so that its PID is free) comes back and counts on from where it was.
      for (const f of readdirSync(pages)) if (/^(pages|pagemap)-/.test(f)) cpSync(join(pages, f), join(images, f));
      const before = counter.count();
      process.kill(counter.pid, 'SIGKILL');
      await counter.exited;
      const { pid } = await client.restore({ imagesDir: images });
      expect(pid).toBe(counter.pid);
      await waitFor(() => counter.count() > before + 3, { what: 'the restored counter to count on' });
      process.kill(pid, 'SIGKILL');
    });
  }

  it('refuses a source whose certificate names another host, or comes from another CA; the process runs on', async () => {
    for (const [name, as] of [
      ['other', other],
      ['intruder', intruder],
    ] as const) {
      const counter = await Counter.start();
      counters.push(counter);
      const { pages, outcome } = await dumpThrough(name, as, counter);
      expect(outcome).toMatch(/^failed/);
      expect(pageBytes(pages)).toBe(0);
      expect(isRunning(counter.pid)).toBe(true);
      const count = counter.count();
      await waitFor(() => counter.count() > count, { what: `the process to count on after ${name} was refused` });
    }
  });
});
