/**
 * Tests that run real CRIU need root. Without it they fail with this reason,
 * never skip: a skipped real-CRIU test must not pass for a green run.
 */
export function requireRoot(): void {
  if (process.getuid?.() !== 0) {
    throw new Error('these tests run real CRIU and need root: run `npm test` as root');
  }
}
