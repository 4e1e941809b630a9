// Steady HTTP load with autocannon, for a fixed time; prints its result as
// one JSON line: requests, errors, timeouts, non-2xx answers, and the
// longest a request waited (the longest gap a client saw).
//
//   node load.mjs URL SECONDS CONNECTIONS
import process from 'node:process';
import autocannon from 'autocannon';

const [url, seconds = '10', connections = '8'] = process.argv.slice(2);
const result = await autocannon({
  url,
  duration: Number(seconds),
  connections: Number(connections),
  timeout: 20,
});
process.stdout.write(
  JSON.stringify({
    requests: result.requests.total,
    errors: result.errors,
    timeouts: result.timeouts,
    non2xx: result.non2xx,
    resets: result.resets ?? 0,
    latencyMaxMs: result.latency.max,
    latencyP50Ms: result.latency.p50,
  }) + '\n',
);
