/**
 * The lab as the tests bring it up: agents run the `ferry` program under
 * test (test/harness/ferry.ts), which gives them the hooks their
 * environment asks for (FERRY_TEST_FAULT, FERRY_TEST_PAUSE_DIR). Everything
 * else is the lab's own door.
 */
import { join } from 'node:path';
import { labUp as labUpWith, type Lab, type LabUpOptions } from '../../controller/lab/index.js';
import { projectRoot } from '../../src/paths.js';

export * from '../../controller/lab/index.js';

export const AGENT_UNDER_TEST = join(projectRoot(), 'dist', 'test', 'harness', 'ferry.js');

export function labUp(options: LabUpOptions = {}): Promise<Lab> {
  return labUpWith({ agentProgram: AGENT_UNDER_TEST, ...options });
}
