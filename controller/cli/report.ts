import { formatBytes, formatDuration } from '../../src/units.js';
import type { MigrationEvent, MigrationReport } from '../migration/index.js';

/** One line per progress event on stderr: elapsed, phase, who, what. */
export function renderEvent(event: MigrationEvent): string {
  const at = `${(event.atMs / 1000).toFixed(2)}s`.padStart(8);
  const t = event.transfer;
  if (t !== undefined) {
    const of = t.expectedBytes === undefined ? '' : ` of ~${formatBytes(t.expectedBytes)}`;
    const bar = t.expectedBytes === undefined ? '' : ` ${progressBar(t.bytes / t.expectedBytes)}`;
    const left = t.leftMs === undefined ? '' : `, ~${formatDuration(t.leftMs)} left`;
    return `${at}  ${event.phase.padEnd(10)} ${event.from.padEnd(10)} pages${bar} ${formatBytes(t.bytes)}${of} at ${formatBytes(t.bytesPerSecond)}/s${left}`;
  }
  const extra: string[] = [];
  if (event.pages !== undefined && event.pages > 0) extra.push(`${event.pages} pages`);
  if (event.bytes !== undefined && event.bytes > 0) extra.push(formatBytes(event.bytes));
  return `${at}  ${event.phase.padEnd(10)} ${event.from.padEnd(10)} ${event.message}${extra.length ? ` (${extra.join(', ')})` : ''}`;
}

/** The final report, for a person. */
export function renderReport(r: MigrationReport): string {
  const lines = [
    '',
    `Migrated ${r.workload ? `workload ${r.workload} (PID ${r.from.pid})` : `PID ${r.from.pid}`} from ${r.from.agent} to ${r.to.agent}: running there as PID ${r.to.pid}.`,
    `  strategy     ${r.strategy}: ${r.strategyReason}`,
  ];
  for (const round of r.rounds) {
    lines.push(
      `  round ${round.round.padEnd(6)} ${round.pagesWritten} pages written, ${round.pagesSkipped} unchanged, ` +
        `${formatBytes(round.bytes)} in ${formatDuration(round.durationMs)}`,
    );
  }
  const moved = r.sockets.filter((s) => s.fate === 'moved').length;
  if (r.sockets.length > 0) lines.push(`  sockets      ${moved} moved with the process`);
  for (const s of r.sockets.filter((x) => x.fate === 'closed')) {
    lines.push(`  reset        ${s.local} ↔ ${s.peer} (--tcp-close): that client saw its connection end`);
  }
  if (r.roundsStopReason !== undefined) lines.push(`  rounds       stopped (${r.policy.rule}): ${r.roundsStopReason}`);
  if (r.postcopy !== undefined) {
    lines.push(
      `  post-copy    ${r.postcopy.lazyPages} pages (${formatBytes(r.postcopy.lazyBytes)}) fetched by the destination ` +
        `after it started, in ${formatDuration(r.postcopy.fetchMs)}`,
      `  risk taken   ${r.postcopy.risk}`,
    );
  }
  lines.push(
    r.postcopy !== undefined
      ? `  final dump   all but the memory: ${r.final.imageFiles} image files (${formatBytes(r.final.imageBytes)})`
      : `  final dump   ${r.final.pagesWritten} pages written, ${r.final.pagesSkipped} unchanged (${formatBytes(r.final.bytes)}); ` +
          `${r.final.imageFiles} other image files (${formatBytes(r.final.imageBytes)}); CRIU frozen ${formatDuration(r.final.frozenMs)}`,
    `  sent         ${formatBytes(r.bytesSent)} (resident ${formatBytes(r.residentBytes)})`,
    `  time         ${formatDuration(r.totalMs)} in all: preflight ${formatDuration(r.phasesMs.preflight)}, ` +
      (r.strategy === 'precopy' ? `pre-copy ${formatDuration(r.phasesMs.precopy)}, ` : '') +
      `switchover ${formatDuration(r.phasesMs.switchover)}, ` +
      `commit ${formatDuration(r.phasesMs.commit)}${r.postcopy !== undefined ? ' (with the post-copy fetch)' : ''}`,
    `  downtime     ${formatDuration(r.downtimeMs)} (frozen on ${r.from.agent} until running on ${r.to.agent})`,
    `  predicted    ${r.policy.prediction}; budget ${formatDuration(r.policy.budgetMs)}: ${r.policy.meetsBudget ? 'predicted to fit' : 'not met'}`,
  );
  return lines.join('\n');
}

/** A 20-cell bar for a fraction (clamped to 0..1): "[#######.............]". */
function progressBar(fraction: number): string {
  const cells = Math.round(Math.min(1, Math.max(0, fraction)) * 20);
  return `[${'#'.repeat(cells)}${'.'.repeat(20 - cells)}]`;
}

/**
 * Prints progress events to a stream: one line each; on a terminal the
 * transfer events of one round redraw a single line (a progress bar), and
 * the next other event starts below it.
 */
export function eventPrinter(stream: NodeJS.WriteStream = process.stderr): (event: MigrationEvent) => void {
  let redrawing = false;
  return (event) => {
    const line = renderEvent(event);
    if (event.transfer !== undefined && stream.isTTY === true) {
      stream.write(`\r${line}\x1b[K`);
      redrawing = true;
      return;
    }
    stream.write(`${redrawing ? '\n' : ''}${line}\n`);
    redrawing = false;
  };
}
