import { setTimeout as sleep } from 'node:timers/promises';

/** Polls until `check` is true; fails with what it waited for. Not a timing assertion: the limit is generous. */
export async function waitFor(
  check: () => boolean | Promise<boolean>,
  options: { what: string; timeoutMs?: number; intervalMs?: number },
): Promise<void> {
  const deadline = Date.now() + (options.timeoutMs ?? 10_000);
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${options.what}`);
    await sleep(options.intervalMs ?? 10);
  }
}
