/**
 * The `ferry` command as the tests run it: the same program, given the test
 * hooks its environment asks for (hooks.ts). The shipped bin/ferry has none;
 * this file is built into dist/test, which the agent bundle leaves out.
 */
import { runCli } from '../../controller/cli/index.js';
import { hooksFromEnvironment } from './hooks.js';

process.exitCode = await runCli(process.argv, { hooks: hooksFromEnvironment() });
