import { copyFileSync, existsSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { AgentContext } from '../context.js';
import { imagesToStream, streamImages, WORKLOAD_LOG, WORKLOAD_LOG_STAT, type StreamResult } from '../images.js';
import type { SourceMigration } from './migration.js';

export type Progress = (message: string, extra?: { bytes?: number }) => void;

/**
 * Streams the final dump's images (and the workload's log) to the
 * destination while the process is frozen.
 */
export async function streamFinal(
  context: AgentContext,
  m: SourceMigration,
  round: string,
  destinationUrl: string,
  progress: Progress,
): Promise<{ sent: StreamResult; streamStarted: number }> {
  const dir = join(m.dir, round);
  progress('dump written; streaming images to the destination');
  const streamStarted = performance.now();
  // Post-copy: the pages CRIU does not serve lazily (not anonymous private memory) are written here.
  const names = imagesToStream(dir, { pages: m.postcopy !== undefined });
  // The workload's log is a file it holds open, so CRIU needs it on the destination, at its size
  // now (frozen): it travels with the images and the destination puts it in place.
  const logFile = m.workload === undefined ? undefined : context.workloads.find(m.workload)?.logFile;
  if (logFile !== undefined && logFile !== '' && existsSync(logFile)) {
    // CRIU checks the file's size, mode and owner on restore: all three travel.
    const { mode, uid, gid } = statSync(logFile);
    copyFileSync(logFile, join(dir, WORKLOAD_LOG));
    writeFileSync(join(dir, WORKLOAD_LOG_STAT), JSON.stringify({ mode: mode & 0o7777, uid, gid }));
    names.push(WORKLOAD_LOG, WORKLOAD_LOG_STAT);
  }
  const peer = await context.peers.connect(destinationUrl, 'destination');
  let sent;
  try {
    sent = await streamImages(peer, { migrationId: m.id, round }, dir, names, m.abort.signal);
  } finally {
    peer.close();
  }
  progress(`streamed ${sent.files} image files`, { bytes: sent.bytes });
  context.metrics.phaseSeconds.observe({ phase: 'stream' }, (performance.now() - streamStarted) / 1000);
  context.metrics.bytesSent.inc(sent.bytes);
  return { sent, streamStarted };
}
