import { log } from '../src/log.js';

/**
 * Fault injection for tests: FERRY_TEST_FAULT="point=action[,point=action]"
 * makes the agent misbehave at a named point, so that tests can prove the
 * rollback paths with real CRIU. Without the variable every call answers
 * undefined and nothing changes.
 *
 * Points and actions:
 *   destination.images-done=corrupt      flip a byte of a received image before its checksum is checked
 *   destination.before-restore=break-images  delete pstree.img so that CRIU's restore fails
 *   POINT=crash                          the agent kills itself (SIGKILL) at POINT:
 *     source.after-hold, source.before-commit-answer, source.after-commit,
 *     destination.during-images, destination.after-restore-held, destination.before-resume-answer
 * The controller has its own crash points (controller/migration.ts):
 *   controller.after-held, controller.after-restored, controller.after-commit
 */
const faults = new Map(
  (process.env.FERRY_TEST_FAULT ?? '')
    .split(',')
    .map((item) => item.split('=') as [string, string | undefined])
    .filter(([point, action]) => point !== '' && action !== undefined) as [string, string][],
);

if (faults.size > 0) log.warn('test faults armed', Object.fromEntries(faults));

export function faultAt(point: string): string | undefined {
  const action = faults.get(point);
  if (action !== undefined) log.warn('injecting a test fault', { point, action });
  return action;
}
