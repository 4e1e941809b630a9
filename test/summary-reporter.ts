import type { Reporter, RunnerTask, RunnerTestFile } from 'vitest';

/** Ends the run with one plain line, "tests: N passed, N failed[, N skipped]", for tools that read it. */
export default class SummaryReporter implements Reporter {
  onFinished(files: RunnerTestFile[] = []): void {
    const counts = { pass: 0, fail: 0, skip: 0 };
    const visit = (task: RunnerTask): void => {
      if (task.type === 'suite') {
        task.tasks.forEach(visit);
        return;
      }
      const state = task.result?.state;
      if (state === 'pass') counts.pass += 1;
      else if (state === 'fail') counts.fail += 1;
      else counts.skip += 1;
    };
    for (const file of files) {
      if (file.result?.state === 'fail' && file.tasks.length === 0) counts.fail += 1; // a file that failed to load
      file.tasks.forEach(visit);
    }
    const skipped = counts.skip > 0 ? `, ${counts.skip} skipped` : '';
    process.stdout.write(`\ntests: ${counts.pass} passed, ${counts.fail} failed${skipped}\n`);
  }
}
