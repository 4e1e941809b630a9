import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { heldSockets, procAddress } from '../../agent/sockets.js';
import { waitFor } from '../helpers/wait.js';

let children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children) c.kill('SIGKILL');
  children = [];
});

/**
 * A python3 process that opens the sockets `code` describes, writes "ready"
 * to a file (its stdio are not sockets, unlike a pipe from node) and sleeps.
 */
async function holder(code: string): Promise<number> {
  const marker = join(mkdtempSync(join(tmpdir(), 'ferry-sockets-')), 'ready');
  const child = spawn(
    'python3',
    ['-c', `${code}\nopen(${JSON.stringify(marker)}, "w").write("ready")\nimport time\ntime.sleep(60)`],
    { stdio: 'ignore' },
  );
  children.push(child);
  await waitFor(() => existsSync(marker), { what: 'the socket holder to start', timeoutMs: 10_000 });
  return child.pid ?? 0;
}

describe('the sockets a process holds', () => {
  it('reads /proc addresses, IPv4 and IPv6', () => {
    expect(procAddress('0100007F:1F90').text).toBe('127.0.0.1:8080');
    expect(procAddress('00000000000000000000000000000000:0050').text).toBe('[::]:80');
    expect(procAddress('00000000000000000000000001000000:0050').text).toBe('[::1]:80');
  });

  it('a wildcard listener and UDP socket move; a connection to a peer on this host does not, and says why', async () => {
    const server = await holder(
      'import socket\nl = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind(("0.0.0.0", 0)); l.listen()\n' +
        'u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 0))\n' +
        'c = socket.create_connection(("127.0.0.1", l.getsockname()[1])); a, _ = l.accept()',
    );
    const sockets = heldSockets([server]);
    const kinds = sockets.map((s) => s.kind).sort();
    expect(kinds).toEqual(['tcp-established', 'tcp-established', 'tcp-listen', 'udp']);
    expect(sockets.find((s) => s.kind === 'tcp-listen')?.moves).toBe(true);
    expect(sockets.find((s) => s.kind === 'udp')?.moves).toBe(true);
    // Both ends of the connection are this process's: they move together.
    expect(sockets.filter((s) => s.kind === 'tcp-established').every((s) => s.peerInTree && s.moves)).toBe(true);

    const client = await holder(
      `import socket\nc = socket.create_connection(("127.0.0.1", ${sockets.find((s) => s.kind === 'tcp-listen')?.local.split(':')[1]}))`,
    );
    const [connection] = heldSockets([client]);
    expect(connection).toMatchObject({ kind: 'tcp-established', moves: false, peerInTree: false });
    expect(connection?.why).toMatch(/peer is on the source host/);
  });

  it('a unix stream connection to a process outside the tree cannot move; a socketpair inside it can', async () => {
    const listener = await holder(
      'import socket, os, threading\np = "/tmp/ferry-sockets-test-%d" % os.getpid()\nl = socket.socket(socket.AF_UNIX); l.bind(p); l.listen()\n' +
        'kept = []\nthreading.Thread(target=lambda: [kept.append(l.accept()) for _ in range(9)], daemon=True).start()\n' +
        'a, b = socket.socketpair()',
    );
    const own = heldSockets([listener]);
    expect(own.find((s) => s.state === 'LISTEN')?.moves).toBe(true);
    expect(own.filter((s) => s.state === 'connected').every((s) => s.moves)).toBe(true);
    const client = await holder(
      `import socket\nc = socket.socket(socket.AF_UNIX); c.connect("/tmp/ferry-sockets-test-${listener}")`,
    );
    const [stream] = heldSockets([client]);
    expect(stream).toMatchObject({ kind: 'unix-stream', moves: false });
    expect(stream?.why).toMatch(/outside the tree/);
  });
});
