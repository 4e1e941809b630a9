/**
 * Daemon logging: one line per event on stderr, "TIME LEVEL message k=v ...".
 * Quiet in tests unless FERRY_LOG is set; FERRY_LOG=debug adds debug lines.
 */
type Fields = Record<string, unknown>;
type Level = 'debug' | 'info' | 'warn' | 'error';

const order: Record<Level, number> = { debug: 0, info: 1, warn: 2, error: 3 };

function threshold(): number {
  const setting = process.env.FERRY_LOG;
  if (setting === 'debug' || setting === 'info' || setting === 'warn' || setting === 'error') return order[setting];
  return process.env.VITEST === undefined ? order.info : order.error + 1;
}

function write(level: Level, message: string, fields: Fields = {}): void {
  if (order[level] < threshold()) return;
  const parts = [new Date().toISOString(), level, message];
  for (const [key, value] of Object.entries(fields)) {
    if (value === undefined) continue;
    const text = typeof value === 'string' ? value : JSON.stringify(value);
    // Quoted when it could pass for more than one value: spaces, quotes, and
    // control characters (a peer's name could otherwise forge lines or drive the terminal).
    parts.push(`${key}=${/[\s"\p{Cc}]/u.test(text) ? JSON.stringify(text) : text}`);
  }
  process.stderr.write(parts.join(' ') + '\n');
}

export const log = {
  debug: (message: string, fields?: Fields) => write('debug', message, fields),
  info: (message: string, fields?: Fields) => write('info', message, fields),
  warn: (message: string, fields?: Fields) => write('warn', message, fields),
  error: (message: string, fields?: Fields) => write('error', message, fields),
};
