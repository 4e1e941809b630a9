/**
 * The `ferry` command line: the program and its commands, the parsers of
 * its values, AGENT resolution, and how results, errors and reports are
 * printed. The only part of the controller that knows commander.
 */
export { directory, holdMs, migrationTarget, nodeName, wholeNumberIn } from './arguments.js';
export { ExitCode, reportError } from './output.js';
export { buildProgram, runCli } from './program.js';
export { eventPrinter, renderEvent, renderReport } from './report.js';
export { resolveAgent, type ResolveOptions } from './resolve.js';
