import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { Hold, type Answer } from '../../agent/hold.js';

function hold(release: (answer: Answer) => Promise<void> = () => Promise.resolve()) {
  const record: string[] = [];
  const abort = new AbortController();
  const h = new Hold(
    { migrationId: 'm-1', role: 'source', signal: abort.signal },
    {
      record: (answer) => record.push(`record ${answer}`),
      release: async (answer) => {
        record.push(`release ${answer}`);
        await release(answer);
      },
    },
  );
  return { h, record, abort };
}

describe('the Hold', () => {
  it('decides once: records, then releases, and every later call gets the first answer', async () => {
    const { h, record } = hold();
    const [first, second] = await Promise.all([h.decide('yes', 'commit'), h.decide('no', 'abort')]);
    expect([first, second]).toEqual(['yes', 'yes']);
    expect(record).toEqual(['record yes', 'release yes']);
  });

  it('a lease decides nothing once pinned, and nothing once the migration’s signal fired', async () => {
    const pinned = hold();
    pinned.h.lease(5, () => void pinned.h.decide('no', 'lease'));
    expect(pinned.h.pin()).toBe(true);
    const cut = hold();
    cut.h.lease(5, () => void cut.h.decide('no', 'lease'));
    cut.abort.abort();
    await sleep(30);
    expect(pinned.record).toEqual([]);
    expect(cut.record).toEqual([]);
  });

  it('pin is refused after a no', async () => {
    const { h } = hold();
    await h.decide('no', 'abort');
    expect(h.pin()).toBe(false);
  });

  it('a release that fails under a lease is logged, not an unhandled rejection that would end the agent', async () => {
    const { h, record } = hold(() => Promise.reject(new Error('ENOTEMPTY')));
    h.lease(5, () => void h.decide('no', 'lease'));
    await sleep(30);
    expect(record).toEqual(['record no', 'release no']);
    await expect(h.decision).rejects.toThrow('ENOTEMPTY');
  });
});
