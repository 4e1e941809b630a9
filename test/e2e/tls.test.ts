import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { hostEndpoint, labDown, labUp, type Lab, type LabHost } from '../helpers/lab.js';
import { listWorkloads } from '../../controller/agents/index.js';
import { createAuthority, issueIdentity, loadAuthority, loadIdentity, type Identity } from '../../src/tls/index.js';
import { RemoteError, WireConnection } from '../../src/wire/index.js';
import { ferryCli } from '../helpers/cli.js';
import { requireRoot } from '../helpers/root.js';
import { waitFor } from '../helpers/wait.js';

const LAB = `tl${process.pid % 100_000}`;
let lab: Lab;
let a: LabHost;
const scratch = mkdtempSync(join(tmpdir(), 'ferry-tls-'));

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB });
  a = lab.hosts[0] as LabHost;
}, 120_000);

afterAll(async () => {
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

const agentLog = (): string => readFileSync(a.logFile, 'utf8');

/** Connects as a controller with this identity; rejects with why the agent would not talk. */
async function connectAs(identity: Identity): Promise<WireConnection> {
  return WireConnection.connect(
    a.url,
    { role: 'controller', name: 'probe', softwareVersion: 'test' },
    { tls: identity },
  );
}

/** How a refused connection ends: the TLS alert or socket error the client sees. */
function refusal(options: WebSocket.ClientOptions): Promise<string> {
  return new Promise((resolve) => {
    const ws = new WebSocket(a.url, { handshakeTimeout: 5_000, ...options });
    ws.on('open', () => {
      ws.terminate();
      resolve('accepted');
    });
    ws.on('error', (error) => resolve(error.message));
  });
}

describe('agents speak mutual TLS only', () => {
  it('accepts the cluster’s controller certificate and logs who connected', async () => {
    const c = await connectAs(loadIdentity(lab.controllerTls ?? ''));
    expect(c.certificate).toMatchObject({ name: 'a', role: 'agent' });
    c.close();
    const logged = new RegExp(`connected role=controller name=probe .*certificate=lab-${LAB} fingerprint=`);
    await waitFor(() => logged.test(agentLog()), {
      what: 'the agent to log the connection',
    });
    const workloads = await listWorkloads(hostEndpoint(a), 'test');
    expect(Array.isArray(workloads)).toBe(true);
  });

  it('refuses a client without a certificate before reading a message, and logs the refusal', async () => {
    const before = agentLog().length;
    const outcome = await refusal({ ca: readFileSync(join(lab.dir, 'tls', 'ca', 'ca.pem')) });
    expect(outcome).not.toBe('accepted');
    expect(outcome).toMatch(/certificate|alert|socket hang up|ECONNRESET/i);
    await waitFor(() => /refused a connection .*reason=.*certificate/i.test(agentLog().slice(before)), {
      what: 'the agent to log the refused handshake',
    });
  });

  it('refuses a certificate from another CA', async () => {
    const other = await createAuthority(join(scratch, 'other-ca'), 'other');
    const stranger = await issueIdentity(other, { role: 'controller', name: 'stranger' }, join(scratch, 'stranger'));
    const outcome = await refusal({
      ca: stranger.ca,
      cert: stranger.cert,
      key: stranger.key,
      rejectUnauthorized: false,
    });
    expect(outcome).not.toBe('accepted');
    await expect(connectAs(stranger)).rejects.toThrow();
  });

  it('refuses an expired certificate of the right CA', async () => {
    const authority = loadAuthority(join(lab.dir, 'tls', 'ca'));
    const day = 86_400_000;
    const expired = await issueIdentity(
      authority,
      {
        role: 'controller',
        name: 'expired',
        notBefore: new Date(Date.now() - 10 * day),
        notAfter: new Date(Date.now() - day),
      },
      join(scratch, 'expired'),
    );
    const before = agentLog().length;
    const outcome = await refusal({ ca: expired.ca, cert: expired.cert, key: expired.key });
    expect(outcome).not.toBe('accepted');
    await waitFor(() => /refused a connection .*expired/i.test(agentLog().slice(before)), {
      what: 'the agent to log the expired certificate',
    });
    // And this side will not even present it.
    expect(() => loadIdentity(expired.dir)).toThrow(/expired/);
  });

  it('refuses plaintext on its TLS port', async () => {
    const outcome = await new Promise<string>((resolve) => {
      const ws = new WebSocket(a.url.replace('wss://', 'ws://'), { handshakeTimeout: 5_000 });
      ws.on('open', () => resolve('accepted'));
      ws.on('error', (error) => resolve(error.message));
    });
    expect(outcome).not.toBe('accepted');
  });

  it('lets another agent’s certificate stream images but not run, dump or list workloads', async () => {
    const authority = loadAuthority(join(lab.dir, 'tls', 'ca'));
    const peer = await issueIdentity(authority, { role: 'agent', name: 'z', hosts: ['127.0.0.1'] }, join(scratch, 'z'));
    const c = await WireConnection.connect(a.url, { role: 'agent', name: 'z', softwareVersion: 'test' }, { tls: peer });
    try {
      const run = c.request({ runWorkload: { name: 'nope', argv: ['/bin/true'] } }, 'workload');
      await expect(run).rejects.toBeInstanceOf(RemoteError);
      await expect(run).rejects.toMatchObject({ code: 'NOT_ALLOWED' });
      await expect(c.request({ listWorkloads: {} }, 'workloadList')).rejects.toMatchObject({ code: 'NOT_ALLOWED' });
      // What agents do ask each other is answered (here: an unknown migration's outcome).
      const outcome = await c.request({ outcomeQuery: { migrationId: 'm0000000000000000' } }, 'outcome');
      expect(outcome.state).toBeDefined();
    } finally {
      c.close();
    }
  });

  it('says plainly on the command line when a URL is plaintext or there is no identity', async () => {
    const plain = await ferryCli('ps', '--on', a.url.replace('wss://', 'ws://'));
    expect(plain.code).toBe(2);
    expect(plain.stderr).toMatch(/plaintext.*--insecure/s);
    const none = await ferryCli('ps', '--on', a.url, '--config', join(scratch, 'no-such-config'));
    expect(none.code).toBe(2);
    expect(none.stderr).toMatch(/ferry init/);
  });
});
