import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { InvalidInputError } from '../../src/errors.js';
import { projectRoot } from '../../src/paths.js';
import { inNetns } from '../../src/proc.js';
import { runWorkload } from '../agents/index.js';
import { migrate, type MigrationEvent, type MigrationReport } from '../migration/index.js';
import { hostEndpoint, labDown, labUp } from './lab.js';

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

/**
 * The main job, end to end: two lab hosts, a counting workload on a, a live
 * migration to b, and the count going on there in b's network namespace.
 */
export async function runDemo(options: DemoOptions): Promise<MigrationReport> {
  const { say } = options;
  const workload = join(projectRoot(), 'dist', 'examples', 'counter');
  if (!existsSync(workload)) throw new InvalidInputError(`${workload} is not built`, { hint: 'run `npm run build`' });
  say('Ferry demo: a live migration between two lab hosts on this machine.\n');
  const lab = await labUp({ name: DEMO_LAB });
  const [a, b] = lab.hosts;
  if (a === undefined || b === undefined) throw new Error('the lab has fewer than two hosts');
  let keep = false;
  try {
    for (const h of lab.hosts) say(`host ${h.host}: agent at ${h.url} (network namespace ${h.netns})`);
    const stateFile = join(a.dataDir, 'counter.state');
    // 64 MiB of memory, 4 MiB of it rewritten every tick; a line every second.
    const started = await runWorkload(
      hostEndpoint(a),
      'counter',
      [workload, stateFile, '100', '64', '4', '10'],
      options.softwareVersion,
    );
    const logFile = started.logFile ?? '';
    say(`\nstarted workload "counter" on a as PID ${started.pid}; its output:`);
    const shown = await follow(logFile, 0, 3, 'a', say, options.signal);

    say('\nmigrating it to b while it runs:');
    const report = await migrate({
      workload: 'counter',
      from: hostEndpoint(a),
      to: hostEndpoint(b),
      softwareVersion: options.softwareVersion,
      onEvent: (e) => say(options.render.event(e)),
      signal: options.signal,
    });
    say(options.render.report(report));

    const pid = report.to.pid;
    const inB = inNetns(pid, b.netns);
    say(`\nits output now, from PID ${pid}${inB ? ` in host b's network namespace` : ''}:`);
    await follow(logFile, shown, 3, 'b', say, options.signal);
    say(
      existsSync(`/proc/${report.from.pid}`)
        ? `\nPID ${report.from.pid} still exists on a: this should not happen`
        : `\nNothing of it runs on a any more; it counted on without starting over.`,
    );
    keep = options.keep === true;
    if (keep) say(`The lab stays up (\`ferry lab down --name ${DEMO_LAB}\` removes it).`);
    return report;
  } finally {
    if (!keep) {
      await labDown(DEMO_LAB);
      say('lab removed.');
    }
  }
}

/** Prints new lines of a log file as they come, `count` of them; returns the offset reached. */
async function follow(
  file: string,
  from: number,
  count: number,
  host: string,
  say: (line: string) => void,
  signal?: AbortSignal,
): Promise<number> {
  let offset = from;
  let printed = 0;
  const deadline = Date.now() + 10_000;
  while (printed < count && Date.now() < deadline) {
    if (existsSync(file) && statSync(file).size > offset) {
      const text = readFileSync(file).subarray(offset).toString('utf8');
      const end = text.lastIndexOf('\n');
      if (end >= 0) {
        for (const line of text.slice(0, end).split('\n')) {
          if (printed < count) say(`  ${host} │ ${line}`);
          printed += 1;
        }
        offset += Buffer.byteLength(text.slice(0, end + 1));
      }
    }
    await sleep(100, undefined, { signal });
  }
  return offset;
}
