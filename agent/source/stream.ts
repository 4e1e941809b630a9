import { join } from 'node:path';
import { carriedRoots, packCarried } from '../carry.js';
import type { AgentContext } from '../context.js';
import { imagesToStream, streamImages, type StreamResult } from '../images.js';
import type { SourceMigration } from './migration.js';

export type Progress = (message: string, extra?: { bytes?: number }) => void;

/**
 * Streams the final dump's images (and the files the workload carries) to
 * the destination while the process is frozen.
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
  // The workload's own files (its directory, its log, its --carry paths) are files it may hold
  // open, which CRIU checks on restore at their size now (frozen): they travel with the images
  // and the destination puts them in place.
  const record = m.workload === undefined ? undefined : context.workloads.find(m.workload);
  if (record !== undefined) names.push(...packCarried(dir, carriedRoots(context.dataDir, record), m.ahead));
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
