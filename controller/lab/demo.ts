import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { projectRoot } from '../../src/paths.js';
import { runWorkload } from '../agents/index.js';
import { migrate, type MigrationEvent, type MigrationReport } from '../migration/index.js';
import { enterHost, firstChild, hostEndpoint, labDown, labUp, onHost, type LabHost } from './lab.js';

export interface DemoOptions {
  /** Leave the lab and the workload running. */
  keep?: boolean | undefined;
  softwareVersion: string;
  signal?: AbortSignal | undefined;
  /** Tells the story, a line at a time (the command line: on stderr). */
  say: (line: string) => void;
  /** How the migration's progress and its report read (the command line's renderers). */
  render: { event: (event: MigrationEvent) => string; report: (report: MigrationReport) => string };
}

const DEMO_LAB = 'ferrydemo';
/** How often the demo's client asks, in seconds. */
const POLL_INTERVAL = 0.05;

/** What the demo's client saw, from its own count. */
export interface DemoClient {
  asked: number;
  answered: number;
  errors: number;
  /** The longest it waited for one answer. */
  longestMs: number;
}

export interface DemoResult extends MigrationReport {
  client: DemoClient;
}

/**
 * The main job, end to end: three lab hosts; a small HTTP server on a,
 * with a service address of its own; a client on c asking it every 50 ms
 * over one keep-alive connection; a live migration of the server to b;
 * and the client's own account: every answer, no error, the longest wait
 * next to the downtime.
 */
export async function runDemo(options: DemoOptions): Promise<DemoResult> {
  const { say } = options;
  const server = join(projectRoot(), 'examples', 'web.py');
  const poller = join(projectRoot(), 'examples', 'poll.py');
  say('Ferry demo: a live migration of an HTTP server between lab hosts on this machine, a client connected.\n');
  const lab = await labUp({ name: DEMO_LAB, hosts: 3 });
  const [a, b, c] = lab.hosts;
  if (a === undefined || b === undefined || c === undefined) throw new Error('the lab has fewer than three hosts');
  let keep = false;
  let client: Poller | undefined;
  try {
    for (const h of lab.hosts) say(`host ${h.host}: agent at ${h.url} (network namespace ${h.netns})`);
    const ip = `${a.address.replace(/\.\d+$/, '')}.80`;
    const started = await runWorkload(
      hostEndpoint(a),
      'web',
      ['python3', server, '--port', '8080', '--memory-mb', '8'],
      options.softwareVersion,
      { address: `${ip}/24` },
    );
    say(`\nstarted workload "web" (examples/web.py) on a as PID ${started.pid}, at its own address ${ip}`);
    const url = `http://${ip}:8080/`;
    say(`a client on host c asks ${url} every ${POLL_INTERVAL * 1000} ms, on one connection:`);
    client = startPoller(c, poller, url);
    await client.lines(3, (line) => say(`  c │ ${line}`), options.signal);

    say('\nmigrating the server to b while the client keeps asking:');
    const report = await migrate({
      workload: 'web',
      from: hostEndpoint(a),
      to: hostEndpoint(b),
      softwareVersion: options.softwareVersion,
      onEvent: (e) => say(options.render.event(e)),
      signal: options.signal,
    });
    say(options.render.report(report));

    const pid = report.to.pid;
    say(`\nthe client now, answered by PID ${pid}${runsWebOn(b, pid) ? ' on host b' : ''}:`);
    client.skip();
    await client.lines(3, (line) => say(`  c │ ${line}`), options.signal);
    const seen = await client.stop();
    say(
      `\nThe client asked ${seen.asked} times: ${seen.answered} answered, ${seen.errors} error${seen.errors === 1 ? '' : 's'}; ` +
        `its longest wait was ${seen.longestMs} ms (downtime ${report.downtimeMs} ms). ` +
        `The count went on: the same process answers, with its memory.`,
    );
    say(
      runsWebOn(a, report.from.pid)
        ? `PID ${report.from.pid} still exists on a: this should not happen`
        : `Nothing of it runs on a any more, and ${ip} is on b now.`,
    );
    keep = options.keep === true;
    if (keep) say(`The lab stays up (\`ferry lab down --name ${DEMO_LAB}\` removes it).`);
    return { ...report, client: seen };
  } finally {
    await client?.stop();
    if (!keep) {
      await labDown(DEMO_LAB);
      say('lab removed.');
    }
  }
}

/** The host's own /proc shows the PID running the demo's server. */
function runsWebOn(host: LabHost, pid: number): boolean {
  try {
    return readFileSync(onHost(host, `/proc/${pid}/cmdline`), 'utf8').includes('web.py');
  } catch {
    return false;
  }
}

interface Poller {
  /** Hands on the next `count` answer lines. */
  lines(count: number, each: (line: string) => void, signal?: AbortSignal): Promise<void>;
  /** Forgets the answers seen so far (not the errors). */
  skip(): void;
  /** Stops the client; resolves with its own summary. */
  stop(): Promise<DemoClient>;
}

/** examples/poll.py in a lab host, its lines kept as they come. */
function startPoller(host: LabHost, script: string, url: string): Poller {
  const child = spawn('nsenter', [...enterHost(host.init), 'python3', script, url, String(POLL_INTERVAL)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const pending: string[] = [];
  let summary: DemoClient | undefined;
  let rest = '';
  child.stdout.on('data', (chunk: Buffer) => {
    rest += chunk.toString();
    const lines = rest.split('\n');
    rest = lines.pop() ?? '';
    for (const line of lines) {
      const [kind, a1, a2, a3, a4] = line.split(' ');
      if (kind === 'summary') {
        summary = { asked: Number(a1), answered: Number(a2), errors: Number(a3), longestMs: Number(a4) };
      } else if (kind === 'ok') pending.push(`${line.slice(kind.length + a1!.length + 2)} (${a1} ms)`);
      else pending.push(line);
    }
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return {
    async lines(count, each, signal) {
      const deadline = Date.now() + 10_000;
      for (let shown = 0; shown < count && Date.now() < deadline;) {
        const line = pending.shift();
        if (line === undefined) await sleep(20, undefined, { signal });
        else {
          each(line);
          shown += 1;
        }
      }
    },
    skip() {
      // An error stays to be shown: the demo hides nothing the client saw.
      const errors = pending.filter((line) => line.startsWith('error '));
      pending.splice(0, pending.length, ...errors);
    },
    async stop() {
      // The client itself, in host c: nsenter does not pass the signal on.
      const client = child.pid === undefined ? undefined : firstChild(child.pid);
      if (client !== undefined && child.exitCode === null && child.signalCode === null) process.kill(client, 'SIGTERM');
      await exited;
      return summary ?? { asked: 0, answered: 0, errors: 0, longestMs: 0 };
    },
  };
}
