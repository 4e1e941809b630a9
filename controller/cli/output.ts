import { FerryError, InvalidInputError } from '../../src/errors.js';
import { OutcomeUnknownError } from '../migration/index.js';

/** Exit codes of the command-line contract. */
export const ExitCode = {
  ok: 0,
  /** Failed; the source (if any) still runs. */
  failed: 1,
  /** Bad input: nothing was changed. */
  badInput: 2,
  /** Outcome unknown: look at both agents before doing anything else. */
  unknown: 3,
} as const;

/** Prints an error as a person needs it (message, then what to do) or as JSON; returns the exit code. */
export function reportError(error: unknown, json: boolean): number {
  const ferry = error instanceof FerryError ? error : undefined;
  const code = ferry?.code ?? 'INTERNAL';
  const message = error instanceof Error ? error.message : String(error);
  if (json) {
    process.stdout.write(JSON.stringify({ error: { code, message, hint: ferry?.hint } }, null, 2) + '\n');
  } else {
    process.stderr.write(`ferry: ${message}\n`);
    if (ferry?.hint !== undefined) process.stderr.write(`  hint: ${ferry.hint}\n`);
    if (ferry === undefined && error instanceof Error && error.stack !== undefined) {
      process.stderr.write(`${error.stack}\n`);
    }
  }
  if (error instanceof InvalidInputError) return ExitCode.badInput;
  return error instanceof OutcomeUnknownError ? ExitCode.unknown : ExitCode.failed;
}

/** A line of progress on stderr, so that stdout stays clean for --json. */
export function progress(line: string): void {
  process.stderr.write(line + '\n');
}

/** Rows as aligned columns, two spaces apart; the last column is not padded (it may be long). */
export function renderTable(rows: readonly (readonly string[])[]): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return rows.map((r) => r.map((c, i) => (i < r.length - 1 ? c.padEnd(widths[i] ?? 0) : c)).join('  ')).join('\n');
}

/** One JSON document on stdout (--json). */
export function json(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}
