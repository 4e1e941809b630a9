import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { formatBytes } from '../../src/units.js';
import type { ProgressMessage } from '../../src/wire/index.js';

/** How often the pages arriving are counted and told. */
export const PAGE_FLOW_INTERVAL_MS = 500;

/** The bytes of page data CRIU's page server has written into a round's directory so far. */
export function pageBytes(dir: string): number {
  let total = 0;
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return 0;
  }
  for (const name of names) {
    if (!/^pages-\d+\.img$/.test(name)) continue;
    try {
      total += statSync(join(dir, name)).size;
    } catch {
      // renamed or removed meanwhile
    }
  }
  return total;
}

/**
 * Tells the controller, twice a second, how many page bytes have arrived
 * in a round's directory and at what rate, while its page server runs: a
 * dump can take seconds with nothing else to say (a 1 GiB stop-and-copy
 * printed "freezing and dumping" and then nothing for 7 s). Ends when the
 * page server has ended (it serves one dump), with one last count if any
 * was told, or when `stop` is aborted. The function it returns ends it at
 * once, with that last count: for a round known to be over before the next
 * count would come.
 */
export function watchPageFlow(options: {
  dir: string;
  serverAlive: () => boolean;
  progress: (p: ProgressMessage) => void;
  base: Pick<ProgressMessage, 'migrationId' | 'phase' | 'round' | 'source'>;
  stop: AbortSignal;
}): () => void {
  const started = performance.now();
  let told = 0;
  const tell = (): void => {
    const bytes = pageBytes(options.dir);
    if (bytes === told) return;
    told = bytes;
    const seconds = (performance.now() - started) / 1000;
    const rate = seconds > 0 ? Math.round(bytes / seconds) : 0;
    options.progress({
      ...options.base,
      message: `pages arriving: ${formatBytes(bytes)} at ${formatBytes(rate)}/s`,
      bytes,
      transfer: true,
      bytesPerSecond: rate,
    });
  };
  const timer = setInterval(() => {
    const alive = options.serverAlive();
    // The last count after the round ended completes a bar already shown; with none shown (a round
    // shorter than the interval) it would only come after the steps that followed (restore, commit).
    if (alive || told > 0) tell();
    if (!alive || options.stop.aborted) clearInterval(timer);
  }, PAGE_FLOW_INTERVAL_MS);
  timer.unref();
  options.stop.addEventListener('abort', () => clearInterval(timer), { once: true });
  let finished = false;
  // The round is over (its dump ended): the last count now, if a count was told, and no more.
  return () => {
    if (finished) return;
    finished = true;
    clearInterval(timer);
    if (told > 0) tell();
  };
}
