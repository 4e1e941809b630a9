#!/usr/bin/env node
// The `ferry` command (bin/ferry, the lab's and the installer's agents start it as dist/controller/main.js).
import { runCli } from './cli/index.js';

process.exitCode = await runCli(process.argv);
