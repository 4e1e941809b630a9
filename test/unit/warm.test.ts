import { afterEach, describe, expect, it } from 'vitest';
import { handsMemoryBack, warmMemory, warmSize } from '../../agent/warm.js';

afterEach(() => {
  delete process.env.FERRY_WARM;
});

describe('warming memory for a switchover', () => {
  it('faults in and frees what is asked where the kernel hands free memory back, and nothing elsewhere', async () => {
    const warmed = await warmMemory(64 * 1024 * 1024);
    if (handsMemoryBack()) {
      expect(warmed?.bytes).toBe(64 * 1024 * 1024);
      expect(warmed?.ms).toBeGreaterThan(0);
    } else {
      expect(warmed).toBeUndefined();
    }
  });

  it('does nothing with FERRY_WARM=0, or when nothing is asked', async () => {
    process.env.FERRY_WARM = '0';
    expect(await warmMemory(64 * 1024 * 1024)).toBeUndefined();
    delete process.env.FERRY_WARM;
    expect(await warmMemory(0)).toBeUndefined();
  });

  it('never asks for more than half of the memory available', () => {
    const GiB = 2 ** 30;
    expect(warmSize(2 * GiB, 16 * GiB)).toBe(2 * GiB);
    expect(warmSize(2 * GiB, 3 * GiB)).toBe(1.5 * GiB);
    expect(warmSize(2 * GiB, 0)).toBe(0);
  });
});
