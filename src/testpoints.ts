import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { log } from './log.js';

/**
 * Pause points for tests. With FERRY_TEST_PAUSE_DIR=DIR, a party that
 * reaches the point named in DIR/armed disarms it, writes DIR/POINT and waits
 * (up to a minute) until the test removes that file. Meanwhile the test can
 * do anything to any party (kill it, cut its network), so every failure can
 * strike at every point. Inert without the variable.
 */
export async function pauseAt(point: string): Promise<void> {
  const dir = process.env.FERRY_TEST_PAUSE_DIR;
  if (dir === undefined || dir === '') return;
  const armed = join(dir, 'armed');
  if (!existsSync(armed) || readFileSync(armed, 'utf8').trim() !== point) return;
  rmSync(armed, { force: true });
  const marker = join(dir, point);
  writeFileSync(marker, String(process.pid));
  log.warn('paused at a test point', { point });
  const deadline = Date.now() + 60_000;
  while (existsSync(marker) && Date.now() < deadline) await sleep(20);
}
