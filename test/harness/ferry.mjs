#!/usr/bin/env node
// The `ferry` command as the tests run it: the same program as bin/ferry (runCli), given test
// hooks. A pause point armed in $FERRY_TEST_PAUSE_DIR (src/testpoints.ts) stops the controller
// there until the test lets it go; without the variable the hooks do nothing.
import process from 'node:process';
import { runCli } from '../../dist/controller/cli/index.js';
import { pauseAt } from '../../dist/src/testpoints.js';

const hooks = { pause: pauseAt, fault: () => undefined };
process.exitCode = await runCli(process.argv, { hooks });
