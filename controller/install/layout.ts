import { sh } from './ssh.js';

/**
 * An installation on a node: where its files go under the prefix, the
 * agent's command line, and the service (systemd unit or supervisor) that
 * keeps it running.
 */

export const DEFAULT_PREFIX = '/opt/ferry';
export const UNIT = '/etc/systemd/system/ferry-agent.service';

/** Everything of an installation lives under its prefix: removing the prefix removes it (but a systemd unit). */
export interface Layout {
  app: string;
  tls: string;
  data: string;
  log: string;
  pid: string;
  supervisor: string;
  hash: string;
}

export function layout(prefix: string): Layout {
  return {
    app: `${prefix}/app`,
    tls: `${prefix}/etc/tls`,
    data: `${prefix}/data`,
    log: `${prefix}/log/agent.log`,
    pid: `${prefix}/run/agent.pid`,
    supervisor: `${prefix}/bin/agent-supervisor`,
    hash: `${prefix}/bundle.sha256`,
  };
}

/** The agent's command line on the node: its own node binary, so the node needs no Node.js. */
export function agentCommand(prefix: string, name: string, address: string, port: number): string[] {
  const p = layout(prefix);
  return [
    `${p.app}/node`,
    `${p.app}/dist/controller/main.js`,
    'agent',
    '--name',
    name,
    '--listen',
    `${address}:${port}`,
    '--data-dir',
    p.data,
    '--tls-dir',
    p.tls,
  ];
}

/** Restarts the agent when it dies; stopped by signalling its process group (the pid file holds the leader). */
export function supervisorScript(prefix: string, command: string[]): string {
  const p = layout(prefix);
  return `#!/bin/sh
# Ferry agent supervisor (no systemd on this node): restarts the agent if it
# exits. Stop it with: kill -TERM -$(cat ${p.pid})
echo $$ >${sh(p.pid)}
trap 'kill -TERM "$agent" 2>/dev/null; wait "$agent"; exit 0' TERM INT
while :; do
  FERRY_LOG=info ${command.map(sh).join(' ')} >>${sh(p.log)} 2>&1 &
  agent=$!
  wait "$agent"
  status=$?
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) supervisor: the agent exited ($status), restarting in 1 s" >>${sh(p.log)}
  sleep 1
done
`;
}

/**
 * KillMode=process: stopping or restarting the agent (an upgrade) must not
 * end the workloads it started, which live in its cgroup; they are detached
 * sessions that outlive the agent, as under the supervisor.
 */
export function systemdUnit(command: string[]): string {
  return `[Unit]
Description=Ferry agent (live migration with CRIU)
After=network-online.target
Wants=network-online.target

[Service]
Environment=FERRY_LOG=info
ExecStart=${command.map((w) => (/[\s"'\\]/.test(w) ? JSON.stringify(w) : w)).join(' ')}
Restart=always
RestartSec=1
KillMode=process

[Install]
WantedBy=multi-user.target
`;
}

export const agentUrl = (address: string, port: number): string =>
  `wss://${address.includes(':') ? `[${address}]` : address}:${port}`;

/** The URL an installed agent listens on, read from its unit or supervisor (`--listen IP:PORT`). */
export function listenUrlOf(service: string): string | undefined {
  const listen = /'?--listen'?\s+'?([^'\s]+)'?/.exec(service)?.[1];
  const match = listen === undefined ? null : /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(listen);
  const host = match?.[1] ?? match?.[2];
  return host === undefined ? undefined : agentUrl(host, Number(match?.[3]));
}
