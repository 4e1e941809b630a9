import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CriuService, readDumpStats, resolveCriuBinary, type NotifyEvent } from '../src/criu/index.js';
import { InvalidInputError } from '../src/errors.js';
import { projectRoot } from '../src/paths.js';
import { formatBytes, formatDuration, PAGE_SIZE } from '../src/units.js';
import { progress } from './output.js';

export interface DemoOptions {
  criu?: string | undefined;
  /** Leave the restored workload running instead of stopping it at the end. */
  keep?: boolean | undefined;
  /** Memory the workload holds, in MiB. */
  memoryMb?: number | undefined;
  signal?: AbortSignal | undefined;
}

export interface DemoReport {
  pid: number;
  countAtFreeze: number;
  countAfterRestore: number;
  dumpMs: number;
  restoreMs: number;
  /** From the dump's request to the restored process running. */
  downtimeMs: number;
  frozenMs: number;
  pagesWritten: number;
}

/**
 * A checkpoint and restore of a running process on this machine, with the
 * CRIU client driving a supervised `criu service`: what every migration
 * does at its core, without the second host.
 */
export async function runDemo(options: DemoOptions): Promise<DemoReport> {
  const memoryMb = options.memoryMb ?? 64;
  if (!Number.isInteger(memoryMb) || memoryMb < 0 || memoryMb > 16_384) {
    throw new InvalidInputError(`--memory must be a whole number of MiB from 0 to 16384 (got ${memoryMb})`);
  }
  const workload = join(projectRoot(), 'dist', 'examples', 'counter');
  if (!existsSync(workload)) {
    throw new InvalidInputError(`the demo workload ${workload} is not built`, { hint: 'run `npm run build`' });
  }
  const binary = resolveCriuBinary(options.criu);
  const scratchParent = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const scratch = mkdtempSync(join(scratchParent, 'ferry-demo-'));
  const images = join(scratch, 'images');
  const stateFile = join(scratch, 'state');
  let pid: number | undefined;
  let keep = false;

  progress('Ferry demo: checkpoint a running process and restore it on this machine.');
  progress('(Live migration between two hosts uses the same steps with a page server on the other host.)');
  const service = await CriuService.start({ binary, signal: options.signal });
  try {
    const client = service.client();
    progress(
      `CRIU ${service.version?.text ?? '?'} from ${binary.source === 'project' ? 'the project prefix' : binary.path}`,
    );

    const child = spawn(workload, [stateFile, '20', String(memoryMb), String(Math.min(4, memoryMb))], {
      detached: true,
      stdio: 'ignore',
    });
    pid = child.pid;
    if (pid === undefined) throw new Error(`cannot start ${workload}`);
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    progress(`workload: PID ${pid}, ${memoryMb} MiB of memory, counting 50 times a second`);
    await showCount(stateFile, 'running', 4, options.signal);

    const dumpStarted = performance.now();
    const dir = mkdtempSync(images);
    await client.dump({ pid, imagesDir: dir, signal: options.signal, onNotify: (e) => narrate(e, dumpStarted) });
    const dumpMs = performance.now() - dumpStarted;
    const countAtFreeze = readCount(stateFile);
    const stats = await readDumpStats(dir);
    progress(
      `checkpoint: ${formatDuration(dumpMs)}, frozen ${formatDuration(stats.frozenTimeUs / 1000)}, ` +
        `${stats.pagesWritten} pages (${formatBytes(stats.pagesWritten * PAGE_SIZE)}) written; count was ${countAtFreeze}`,
    );
    await exited; // the PID is free again only once the old process is reaped

    const restoreStarted = performance.now();
    const { pid: restoredPid } = await client.restore({ imagesDir: dir, signal: options.signal });
    const restoreMs = performance.now() - restoreStarted;
    const downtimeMs = performance.now() - dumpStarted;
    progress(`restore: ${formatDuration(restoreMs)}, running again as PID ${restoredPid}`);
    await showCount(stateFile, 'restored', 4, options.signal);
    const countAfterRestore = readCount(stateFile);
    progress(
      `The process went on from count ${countAtFreeze} to ${countAfterRestore} with the same PID; ` +
        `it was stopped for ${formatDuration(downtimeMs)} in all.`,
    );
    keep = options.keep === true;
    if (keep) progress(`It keeps running (PID ${restoredPid}); its count is in ${stateFile}.`);
    return {
      pid: restoredPid,
      countAtFreeze,
      countAfterRestore,
      dumpMs,
      restoreMs,
      downtimeMs,
      frozenMs: stats.frozenTimeUs / 1000,
      pagesWritten: stats.pagesWritten,
    };
  } finally {
    if (!keep) {
      if (pid !== undefined) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      rmSync(scratch, { recursive: true, force: true });
    }
    await service.stop();
  }
}

function narrate(event: NotifyEvent, started: number): boolean {
  const at = formatDuration(performance.now() - started);
  if (event.script === 'pre-dump') progress(`  ${at}  dump started`);
  if (event.script === 'post-dump') progress(`  ${at}  images written; CRIU now stops the original`);
  return true;
}

async function showCount(
  stateFile: string,
  label: string,
  times: number,
  signal: AbortSignal | undefined,
): Promise<void> {
  for (let i = 0; i < times; i++) {
    await sleep(250, undefined, { signal });
    progress(`  ${label}: count ${readCount(stateFile)}`);
  }
}

function readCount(stateFile: string): number {
  const match = /^\d+ (\d+)/.exec(readFileSync(stateFile, 'utf8'));
  return Number(match?.[1] ?? NaN);
}
