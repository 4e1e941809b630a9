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
 *   destination.page-server=fill-images  fill the (small) images file system before the page server starts
 *   source.frozen=kill-criu-worker       kill the CRIU worker while it dumps
 * Crashes and network cuts at any point are done by tests from outside,
 * while a party waits at a pause point (src/testpoints.ts).
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
