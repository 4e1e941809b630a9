import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { projectRoot } from '../../src/paths.js';

const execFileAsync = promisify(execFile);
/** bin/ferry's program with test hooks (pause points armed through FERRY_TEST_PAUSE_DIR). */
export const FERRY_BIN = join(projectRoot(), 'test', 'harness', 'ferry.mjs');

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the real `ferry` command; resolves with its exit code and output, whatever the code. */
export async function runFerry(args: readonly string[], env: Record<string, string> = {}): Promise<CliResult> {
  try {
    const { stdout, stderr } = await execFileAsync(FERRY_BIN, [...args], {
      timeout: 120_000,
      env: { ...process.env, ...env },
    });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

export const ferryCli = (...args: string[]): Promise<CliResult> => runFerry(args);
