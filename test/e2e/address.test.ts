import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { listWorkloads } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { runFerry } from '../helpers/cli.js';
import { commandPidOn, enterHostArgs, inHost, killOn, onHost, runsOn } from '../helpers/hosts.js';
import { hostEndpoint, labDown, labUp, type Lab, type LabHost } from '../helpers/lab.js';
import { requireRoot } from '../helpers/root.js';
import { waitFor } from '../helpers/wait.js';

/**
 * A workload's service address moving with it (docs/network.md), on four
 * lab hosts: the workload starts on a and moves to b and back; the clients
 * run on c, another host of the segment, so they reach the address only
 * through the network and learn its move only from the announcement; d's
 * agent breaks every restore (its images lose pstree.img), for rollbacks
 * after the address has moved. Real CRIU, real sockets, real ARP.
 */
const LAB = `fa${process.pid % 100_000}`;
const CLIENTS = join(projectRoot(), 'test', 'helpers', 'clients');
const WEB = join(projectRoot(), 'examples', 'web.py');
const ECHO = join(projectRoot(), 'examples', 'echo.py');
const NFT = join(projectRoot(), '.criu', 'bin', 'nft');
let lab: Lab;
let a: LabHost;
let b: LabHost;
let c: LabHost;
let d: LabHost;
let subnet: string;
/** A client program running in host c: the nsenter that started it, and its command line there. */
interface Client {
  child: ChildProcess;
  argv: string[];
}
let clients: Client[] = [];

beforeAll(async () => {
  requireRoot();
  lab = await labUp({
    name: LAB,
    hosts: 4,
    agentEnv: { d: { FERRY_TEST_FAULT: 'destination.before-restore=break-images' } },
  });
  [a, b, c, d] = lab.hosts as [LabHost, LabHost, LabHost, LabHost];
  subnet = a.address.replace(/\.\d+$/, '');
}, 60_000);

afterEach(async () => {
  for (const client of clients) {
    await killOn(c, commandPidOn(c, client.argv) ?? 0);
    client.child.kill('SIGKILL');
  }
  clients = [];
});

afterAll(async () => {
  await labDown(LAB);
});

const ferry = (...args: string[]) => runFerry(args, { FERRY_LAB: LAB });

/** Starts a client program in host c. */
function onC(argv: string[]): Client {
  const client = {
    child: spawn('nsenter', [...enterHostArgs(c), ...argv], { stdio: ['ignore', 'pipe', 'inherit'] }),
    argv,
  };
  clients.push(client);
  return client;
}

/** The IPv4 addresses on a host's eth0. */
function addresses(host: LabHost): string[] {
  const out = execFileSync('ip', ['-n', host.netns, '-o', '-4', 'addr', 'show', 'dev', 'eth0'], { encoding: 'utf8' });
  return [...out.matchAll(/inet (\S+)/g)].map((m) => m[1] ?? '');
}

/** The hardware address a host's neighbour table has for an IP. */
function neighbour(host: LabHost, ip: string): string {
  const out = execFileSync('ip', ['-n', host.netns, 'neigh', 'show', ip], { encoding: 'utf8' });
  return /lladdr (\S+)/.exec(out)?.[1] ?? '';
}

/** A host's own hardware address on eth0. */
function mac(host: LabHost): string {
  const out = execFileSync('ip', ['-n', host.netns, 'link', 'show', 'dev', 'eth0'], { encoding: 'utf8' });
  return /link\/ether (\S+)/.exec(out)?.[1] ?? '';
}

/** The nftables tables in a host's network namespace (CRIU's lock tables, Ferry's holds). */
function tables(host: LabHost): string[] {
  const out = execFileSync('ip', ['netns', 'exec', host.netns, NFT, 'list', 'tables'], { encoding: 'utf8' });
  return out.split('\n').filter(Boolean);
}

async function workloadOn(host: LabHost, name: string): Promise<{ pid: number; address: string } | undefined> {
  const w = (await listWorkloads(hostEndpoint(host), 'test')).find((x) => x.name === name && x.state === 'running');
  return w === undefined ? undefined : { pid: w.pid ?? 0, address: w.address ?? '' };
}

async function run(name: string, address: string, argv: string[], extra: string[] = []): Promise<number> {
  const started = await ferry(
    'run',
    '--on',
    'a',
    '--name',
    name,
    '--address',
    address,
    ...extra,
    '--json',
    '--',
    ...argv,
  );
  expect(started.code, started.stderr).toBe(0);
  return (JSON.parse(started.stdout) as { pid: number }).pid;
}

/** Where a client on host c writes its result: a file in c's own /tmp. */
function clientOut(name: string): string {
  return `/tmp/${name}.json`;
}

/** Reads a client's running count (its OUT.count file on host c). */
function count(out: string): number {
  const file = onHost(c, `${out}.count`);
  return existsSync(file) ? Number(readFileSync(file, 'utf8') || 0) : 0;
}

/** Stops a client (SIGTERM to it in host c: nsenter does not pass signals on) and reads its result there. */
async function stop(client: Client, out: string): Promise<Record<string, unknown>> {
  await killOn(c, commandPidOn(c, client.argv) ?? 0, 'TERM');
  // Read once whole: the client may still be writing it.
  let result: Record<string, unknown> | undefined;
  await waitFor(
    () => {
      try {
        result = JSON.parse(readFileSync(onHost(c, out), 'utf8')) as Record<string, unknown>;
        return true;
      } catch {
        return false;
      }
    },
    { what: 'the client to write its result', timeoutMs: 10_000 },
  );
  return result ?? {};
}

/**
 * An address hook installed at the same path on hosts a and b (as on real
 * nodes): it logs each call, with the time, in its own host's /tmp;
 * a take fails, or hangs while the host has /tmp/ferry-hook-hang.
 */
const HOOK = '/etc/ferry/address-hook';
const HOOK_CALLS = '/tmp/ferry-hook-calls';
const HOOK_HANG = '/tmp/ferry-hook-hang';

function installHook(host: LabHost): void {
  const file = onHost(host, HOOK);
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(
    file,
    `#!/bin/sh\necho "$(date +%s%N) $1 $2 $FERRY_NODE $FERRY_WORKLOAD" >> ${HOOK_CALLS}\n` +
      `[ "$1" = take ] && [ -f ${HOOK_HANG} ] && exec sleep 60\n` +
      `[ "$1" = take ] && { echo "the router said no" >&2; exit 3; }\nexit 0\n`,
  );
  chmodSync(file, 0o755);
}

/** The hook's calls on these hosts, in the order they were made (without their time). */
function hookCalls(...hosts: LabHost[]): string[] {
  return hosts
    .flatMap((h) => {
      const file = onHost(h, HOOK_CALLS);
      return existsSync(file) ? readFileSync(file, 'utf8').trim().split('\n') : [];
    })
    .map((line) => /^(\d+) (.*)$/.exec(line) ?? ['', '0', line])
    .sort((x, y) => (BigInt(x[1] ?? 0) < BigInt(y[1] ?? 0) ? -1 : 1))
    .map((m) => m[2] ?? '');
}

interface Report {
  downtimeMs: number;
}

describe('the service address moves with the workload', () => {
  it('a TCP echo connection from another host survives a → b → a: nothing lost, repeated or reordered', async () => {
    const ip = `${subnet}.50`;
    await run('echo', `${ip}/24`, ['python3', ECHO, '--port', '9000']);
    expect(addresses(a)).toContain(`${ip}/24`);
    const out = clientOut('echo');
    const client = onC(['python3', join(CLIENTS, 'echo_client.py'), ip, '9000', out]);
    await waitFor(() => count(out) > 20, { what: 'the client to echo', timeoutMs: 15_000 });

    const there = await ferry('migrate', 'echo', '--from', 'a', '--to', 'b', '--json');
    expect(there.code, there.stderr).toBe(0);
    expect(there.stderr).toMatch(new RegExp(`tcp-established ${ip.replace(/\./g, '\\.')}:9000 ↔ .*: moves`));
    expect(addresses(a)).not.toContain(`${ip}/24`);
    expect(addresses(b)).toContain(`${ip}/24`);
    const before = count(out);
    await waitFor(() => count(out) > before + 20, { what: 'echoes from b', timeoutMs: 15_000 });

    const back = await ferry('migrate', 'echo', '--from', 'b', '--to', 'a', '--json');
    expect(back.code, back.stderr).toBe(0);
    const after = count(out);
    await waitFor(() => count(out) > after + 20, { what: 'echoes from a again', timeoutMs: 15_000 });

    const result = await stop(client, out);
    expect(result.errors).toEqual([]);
    const downtimes = [there, back].map((r) => (JSON.parse(r.stdout) as Report).downtimeMs);
    console.log(
      `echo across a → b → a: ${String(result.echoed)} echoes, no error; longest gap ${String(result.max_gap_ms)} ms; ` +
        `downtime ${downtimes.join(' and ')} ms`,
    );
    expect(addresses(a)).toContain(`${ip}/24`);
    expect(addresses(b)).not.toContain(`${ip}/24`);
    // CRIU's lock tables and Ferry's holds are gone from both hosts.
    expect(tables(a)).toEqual([]);
    expect(tables(b)).toEqual([]);
  }, 120_000);

  it('UDP request and response carry on across the move', async () => {
    const ip = `${subnet}.51`;
    await run('udp', `${ip}/24`, ['python3', ECHO, '--port', '9010']);
    const out = clientOut('udp');
    const client = onC(['python3', join(CLIENTS, 'udp_client.py'), ip, '9011', out]);
    await waitFor(() => count(out) > 20, { what: 'the client to get answers', timeoutMs: 15_000 });
    const moved = await ferry('migrate', 'udp', '--from', 'a', '--to', 'b');
    expect(moved.code, moved.stderr).toBe(0);
    expect(moved.stderr).toMatch(/socket udp 0\.0\.0\.0:9011 bound: moves/);
    const after = count(out);
    await waitFor(() => count(out) > after + 20, { what: 'answers from b', timeoutMs: 15_000 });
    const result = await stop(client, out);
    expect(result.wrong).toBe(0);
    console.log(
      `UDP across a → b: ${String(result.answered)} of ${String(result.sent)} answered; longest gap ${String(result.max_gap_ms)} ms`,
    );
    expect(await workloadOn(b, 'udp')).toMatchObject({ address: `${ip}/24` });
  }, 90_000);

  it('an HTTP server under steady load moves with no failed request and no connection error', async () => {
    const ip = `${subnet}.52`;
    await run('web', `${ip}/24`, ['python3', WEB, '--port', '8080', '--memory-mb', '8']);
    await waitFor(
      () =>
        inHost(c, [
          'python3',
          '-c',
          `import urllib.request; urllib.request.urlopen("http://${ip}:8080/", timeout=1)`,
        ]).then(
          () => true,
          () => false,
        ),
      { what: 'the server to answer', timeoutMs: 15_000 },
    );
    const load = onC(['node', join(CLIENTS, 'load.mjs'), `http://${ip}:8080/`, '8', '8']);
    let output = '';
    load.child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const ended = new Promise((resolve) => load.child.once('exit', resolve));
    await new Promise((resolve) => setTimeout(resolve, 2_500));
    const moved = await ferry('migrate', 'web', '--from', 'a', '--to', 'b', '--json');
    expect(moved.code, moved.stderr).toBe(0);
    await ended;
    const result = JSON.parse(output) as {
      requests: number;
      errors: number;
      timeouts: number;
      non2xx: number;
      latencyMaxMs: number;
    };
    console.log(
      `HTTP under load across a → b: ${result.requests} requests, ${result.errors} errors, ${result.timeouts} timeouts, ` +
        `${result.non2xx} non-2xx; longest request ${result.latencyMaxMs} ms; downtime ${(JSON.parse(moved.stdout) as Report).downtimeMs} ms`,
    );
    expect(result).toMatchObject({ errors: 0, timeouts: 0, non2xx: 0 });
    expect(result.requests).toBeGreaterThan(100);
  }, 90_000);

  it('a rollback after the address moved puts the address and the process back on the source, and the client carries on', async () => {
    const ip = `${subnet}.53`;
    const pid = await run('rollback', `${ip}/24`, ['python3', ECHO, '--port', '9020']);
    const out = clientOut('rollback');
    const client = onC(['python3', join(CLIENTS, 'echo_client.py'), ip, '9020', out]);
    await waitFor(() => count(out) > 20, { what: 'the client to echo', timeoutMs: 15_000 });
    // d's agent deletes pstree.img once the address is its: CRIU's restore fails there.
    const failed = await ferry('migrate', 'rollback', '--from', 'a', '--to', 'd');
    expect(failed.code, failed.stderr).toBe(1);
    expect(failed.stderr).toMatch(/rolled back|resumed on a|runs on a/);
    expect(runsOn(a, pid)).toBe(true);
    expect(addresses(a)).toContain(`${ip}/24`);
    expect(addresses(d)).not.toContain(`${ip}/24`);
    expect(tables(d)).toEqual([]);
    const after = count(out);
    await waitFor(() => count(out) > after + 20, { what: 'echoes from a after the rollback', timeoutMs: 15_000 });
    // Past the time d would still have been announcing the address (three, a second apart), host c
    // still sends it to a: d stopped announcing when it gave the address up.
    await new Promise((resolve) => setTimeout(resolve, 2_500));
    expect(neighbour(c, ip)).toBe(mac(a));
    expect((await stop(client, out)).errors).toEqual([]);
  }, 90_000);
});

describe('bad input about addresses', () => {
  it('refuses an address that is not IPv4, or that the node already has: exit 2, nothing started', async () => {
    const v6 = await ferry('run', '--on', 'a', '--name', 'v6', '--address', '2001:db8::5/64', '--', 'sleep', '100');
    expect(v6.code, v6.stderr).toBe(2);
    expect(v6.stderr).toMatch(/IPv6 service addresses are not supported yet/);
    const taken = await ferry(
      'run',
      '--on',
      'a',
      '--name',
      'taken',
      '--address',
      `${a.address}/24`,
      '--',
      'sleep',
      '100',
    );
    expect(taken.code, taken.stderr).toBe(2);
    expect(taken.stderr).toMatch(new RegExp(`${a.address.replace(/\./g, '\\.')} is already on eth0 here`));
    expect(await workloadOn(a, 'taken')).toBeUndefined();
    const noHook = await ferry(
      'run',
      '--on',
      'a',
      '--name',
      'nohook',
      '--address',
      `${subnet}.59/24`,
      '--address-hook',
      '/nonexistent/hook',
      '--',
      'sleep',
      '100',
    );
    expect(noHook.code, noHook.stderr).toBe(2);
    expect(addresses(a)).not.toContain(`${subnet}.59/24`);
  });

  it('refuses to move an address the destination already has: exit 2, nothing touched', async () => {
    const ip = `${subnet}.54`;
    const pid = await run('clash', `${ip}/24`, ['python3', ECHO, '--port', '9030']);
    execFileSync('ip', ['-n', b.netns, 'addr', 'add', `${ip}/24`, 'dev', 'eth0']);
    try {
      const refused = await ferry('migrate', 'clash', '--from', 'a', '--to', 'b');
      expect(refused.code, refused.stderr).toBe(2);
      expect(refused.stderr).toMatch(
        new RegExp(`address ${ip.replace(/\./g, '\\.')}/24 cannot move to b: .*already on eth0`),
      );
      expect(runsOn(a, pid)).toBe(true);
      expect(addresses(a)).toContain(`${ip}/24`);
    } finally {
      execFileSync('ip', ['-n', b.netns, 'addr', 'del', `${ip}/24`, 'dev', 'eth0']);
    }
  });

  it('refuses a socket bound to an address of the source host that is not the workload’s', async () => {
    const pid = await run('bound', `${subnet}.55/24`, ['python3', ECHO, '--port', '9040', '--bind', a.address]);
    const refused = await ferry('migrate', 'bound', '--from', 'a', '--to', 'b');
    expect(refused.code, refused.stderr).toBe(2);
    expect(refused.stderr).toMatch(/bound to .*not the workload's/);
    expect(runsOn(a, pid)).toBe(true);
  });

  it('an address hook that fails, or hangs past its timeout, rolls the migration back: exit 1, all back on the source', async () => {
    for (const host of [a, b]) installHook(host);
    const ip = `${subnet}.56`;
    const pid = await run('hooked', `${ip}/24`, ['python3', ECHO, '--port', '9050'], ['--address-hook', HOOK]);

    const failed = await ferry('migrate', 'hooked', '--from', 'a', '--to', 'b');
    expect(failed.code, failed.stderr).toBe(1);
    expect(failed.stderr).toMatch(/the address hook .* take failed \(exit code 3\): the router said no/);
    expect(runsOn(a, pid)).toBe(true);
    expect(addresses(a)).toContain(`${ip}/24`);
    expect(addresses(b)).not.toContain(`${ip}/24`);
    // b's hook was told to take it, then a's to take it back: each ran on its own host.
    expect(hookCalls(b)).toEqual([`take ${ip}/24 b hooked`]);
    expect(hookCalls(a)).toEqual([`return ${ip}/24 a hooked`]);
    expect(hookCalls(a, b)).toEqual([`take ${ip}/24 b hooked`, `return ${ip}/24 a hooked`]);

    writeFileSync(onHost(b, HOOK_HANG), '');
    const hung = await ferry('migrate', 'hooked', '--from', 'a', '--to', 'b');
    expect(hung.code, hung.stderr).toBe(1);
    expect(hung.stderr).toMatch(/did not finish within 10 s/);
    expect(runsOn(a, pid)).toBe(true);
    expect(addresses(a)).toContain(`${ip}/24`);
    expect(addresses(b)).not.toContain(`${ip}/24`);
  }, 90_000);
});
