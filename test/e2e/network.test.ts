import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { runWorkload } from '../../controller/agents/index.js';
import { runFerry } from '../helpers/cli.js';
import { commandPidOn, enterHostArgs, inHost, killOn, onHost, runsOn } from '../helpers/hosts.js';
import { hostEndpoint, labDown, labUp, type Lab, type LabHost } from '../helpers/lab.js';
import { requireRoot } from '../helpers/root.js';
import { sleep, waitFor } from '../helpers/wait.js';

const LAB = `fn${process.pid % 100_000}`;
let lab: Lab;
let a: LabHost;
let b: LabHost;
let c: LabHost;
/** Programs the test started in a host: the nsenter, and the host with the command line it runs there. */
let clients: { child: ChildProcess; host: LabHost; argv: string[] }[] = [];

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB, hosts: 3 });
  [a, b, c] = lab.hosts as [LabHost, LabHost, LabHost];
}, 60_000);

afterEach(async () => {
  for (const client of clients) {
    // nsenter does not pass a signal on to what it started in the host.
    await killOn(client.host, commandPidOn(client.host, client.argv) ?? 0);
    client.child.kill('SIGKILL');
  }
  clients = [];
});

afterAll(async () => {
  await labDown(LAB);
});

/** Runs python3 code in lab host `host`, in the background. */
function pythonOn(host: LabHost, code: string): ChildProcess {
  const argv = ['python3', '-c', code];
  const child = spawn('nsenter', [...enterHostArgs(host), ...argv], { stdio: 'ignore' });
  clients.push({ child, host, argv });
  return child;
}

/** One HTTP GET from host c: the status code, or the error's name. */
async function get(url: string): Promise<string> {
  const said = await inHost(c, [
    'python3',
    '-c',
    `import urllib.request\ntry:\n  r = urllib.request.urlopen(${JSON.stringify(url)}, timeout=3); s = str(r.status)\n` +
      `except Exception as e:\n  s = type(e).__name__ + ": " + str(e)\nprint(s, end="")`,
  ]).catch(() => '');
  return said === '' ? 'no answer' : said;
}

const migrate = (name: string, ...extra: string[]) =>
  runFerry(['migrate', name, '--from', 'a', '--to', 'b', ...extra], { FERRY_LAB: LAB });

describe('network services', () => {
  it('an HTTP server listening on a wildcard address moves, and answers on the destination', async () => {
    const w = await runWorkload(
      hostEndpoint(a),
      'web',
      // It serves its own directory, which moves with it.
      ['python3', '-m', 'http.server', '8080', '--bind', '0.0.0.0', '--directory', '.'],
      'test',
    );
    await waitFor(async () => (await get(`http://${a.address}:8080/`)) === '200', {
      what: 'the server to answer on a',
      timeoutMs: 10_000,
    });
    const moved = await migrate('web');
    expect(moved.code, moved.stderr).toBe(0);
    expect(moved.stderr).toMatch(/socket tcp-listen 0\.0\.0\.0:8080 LISTEN: moves/);
    expect(await get(`http://${b.address}:8080/`)).toBe('200');
    expect(await get(`http://${a.address}:8080/`)).toMatch(/refused/i);
    expect(runsOn(a, w.pid ?? 0)).toBe(false);
  });

  it('a connection from a client on another host is listed and refused before anything is touched; --tcp-close resets it', async () => {
    // A server that keeps every connection it accepts, and a client on host c that holds one open.
    const w = await runWorkload(
      hostEndpoint(a),
      'held',
      [
        'python3',
        '-c',
        'import socket\nl = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n' +
          'l.bind(("0.0.0.0", 9090)); l.listen()\nkept = []\nwhile True: kept.append(l.accept())',
      ],
      'test',
    );
    // It writes how its connection is to a file in c's own /tmp.
    const status = '/tmp/client-status';
    const statusOf = (): string => readFileSync(onHost(c, status), 'utf8');
    pythonOn(
      c,
      `import socket, time\nwhile True:\n  try:\n    s = socket.create_connection((${JSON.stringify(a.address)}, 9090)); break\n` +
        `  except OSError: time.sleep(0.1)\nopen(${JSON.stringify(status)}, "w").write("connected")\n` +
        `try:\n  data = s.recv(1)\n  r = "closed" if data == b"" else "data"\nexcept OSError as e:\n  r = type(e).__name__\n` +
        `open(${JSON.stringify(status)}, "w").write(r)`,
    );
    await waitFor(() => existsSync(onHost(c, status)), { what: 'the client to connect', timeoutMs: 10_000 });

    const refused = await migrate('held');
    expect(refused.code, refused.stderr).toBe(2);
    expect(refused.stderr).toMatch(/holds 1 socket\(s\) that cannot move/);
    expect(refused.stderr).toMatch(
      new RegExp(
        `socket tcp-established ${a.address.replace(/\./g, '\\.')}:9090 ↔ ${c.address.replace(/\./g, '\\.')}:\\d+ ESTABLISHED: cannot move`,
      ),
    );
    expect(refused.stderr).toMatch(/hint: add --tcp-close/);
    await sleep(200);
    expect(runsOn(a, w.pid ?? 0)).toBe(true);
    expect(statusOf()).toBe('connected');

    const closed = await migrate('held', '--tcp-close', '--json');
    expect(closed.code, closed.stderr).toBe(0);
    expect(closed.stderr).toMatch(/ESTABLISHED: closed \(--tcp-close\)/);
    const report = JSON.parse(closed.stdout) as { sockets: { kind: string; peer: string; fate: string }[] };
    expect(report.sockets.filter((s) => s.fate === 'closed').map((s) => s.peer.split(':')[0])).toEqual([c.address]);
    expect(report.sockets.find((s) => s.kind === 'tcp-listen')?.fate).toBe('moved');
    // The client's connection ended (it was reset, or closed by the restored copy); the server listens on b.
    await waitFor(() => statusOf() !== 'connected', {
      what: 'the client to see its connection end',
      timeoutMs: 30_000,
    });
    expect(statusOf()).toMatch(/ConnectionResetError|closed|TimeoutError/);
    expect(runsOn(a, w.pid ?? 0)).toBe(false);
  }, 90_000);
});
