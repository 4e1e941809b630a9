import {
  chmodSync,
  chownSync,
  constants,
  copyFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  renameSync,
  statSync,
} from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { log } from '../../src/log.js';
import { logAttributes, sha256Of, WORKLOAD_LOG, WORKLOAD_LOG_STAT } from '../images.js';
import type { DestinationMigration } from './migration.js';

/**
 * Puts the workload's log where the process expects it. Only inside this
 * agent's own workloads directory (a path from the wire is never trusted
 * further), and a file already there with the same content is left alone:
 * on a shared file system it is the very file the frozen source holds,
 * and replacing it would cut the source's output off if it resumes.
 */
export function placeWorkloadLog(dataDir: string, m: DestinationMigration, dir: string): void {
  const copy = join(dir, WORKLOAD_LOG);
  const wanted = m.workload?.logFile ?? '';
  if (!existsSync(copy) || !existsSync(join(dir, WORKLOAD_LOG_STAT)) || wanted === '') return;
  const home = resolve(dataDir, 'workloads');
  const target = resolve(wanted);
  if (dirname(target) !== home) {
    log.warn('a workload log outside this agent’s workloads directory is not placed', {
      migration: m.id,
      path: wanted,
    });
    return;
  }
  mkdirSync(home, { recursive: true });
  if (existsSync(target) && sameContent(target, copy)) return;
  const temporary = `${target}.${m.id}.tmp`;
  copyFileSync(copy, temporary, constants.COPYFILE_EXCL);
  const stat = logAttributes(join(dir, WORKLOAD_LOG_STAT));
  chmodSync(temporary, stat.mode);
  chownSync(temporary, stat.uid, stat.gid);
  renameSync(temporary, target);
}

function sameContent(a: string, b: string): boolean {
  // A symlink where the log goes is replaced, not read through.
  return lstatSync(a).isFile() && statSync(a).size === statSync(b).size && sha256Of(a) === sha256Of(b);
}
