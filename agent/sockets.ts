/**
 * The sockets a process tree holds, and what a migration can do with each,
 * read from /proc before anything is frozen: the socket inodes in
 * /proc/PID/fd, matched against the tables of the tree's network namespace
 * (/proc/PID/net/{tcp,tcp6,udp,udp6,unix}), and for unix sockets their
 * peers (ss -x, from the kernel's unix_diag), since /proc does not name
 * them.
 *
 * What CRIU 4.2 can move here (docs/network.md, measured):
 * - a listening TCP socket or a UDP socket bound to a wildcard or loopback
 *   address: restored on the destination as it was;
 * - an established TCP connection whose both ends are in the tree;
 * - an established connection to a peer outside the tree only if its local
 *   address exists on the destination (CRIU rebinds it: "Can't bind inet
 *   socket back: Cannot assign requested address" otherwise), and not when
 *   the peer is on the source host itself (loopback): that peer stays
 *   behind;
 * - a unix datagram socket with a peer outside the tree (ext_unix_sk); a
 *   unix stream or seqpacket connection to a peer outside the tree cannot
 *   move ("Can't dump half of stream unix connection").
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';

export type SocketKind =
  'tcp-listen' | 'tcp-established' | 'tcp-other' | 'udp' | 'unix-stream' | 'unix-dgram' | 'unix-seqpacket';

export interface HeldSocket {
  kind: SocketKind;
  inode: string;
  /** "10.0.0.1:8080", "[::]:8080", or a unix path ('' when unnamed). */
  local: string;
  /** The peer's address ('' when none), or for unix sockets its inode ("inode 1234"). */
  peer: string;
  /** The kernel's state name (LISTEN, ESTABLISHED, ...). */
  state: string;
  /** Whether the other end is in the same process tree (both move together). */
  peerInTree: boolean;
  /** Whether it can move, and if not, why. */
  moves: boolean;
  why: string;
}

const TCP_STATES = [
  '',
  'ESTABLISHED',
  'SYN_SENT',
  'SYN_RECV',
  'FIN_WAIT1',
  'FIN_WAIT2',
  'TIME_WAIT',
  'CLOSE',
  'CLOSE_WAIT',
  'LAST_ACK',
  'LISTEN',
  'CLOSING',
];

/** The socket inodes the processes hold. */
function heldInodes(tree: readonly number[]): Set<string> {
  const held = new Set<string>();
  for (const p of tree) {
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${p}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        const match = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${p}/fd/${fd}`));
        if (match?.[1] !== undefined) held.add(match[1]);
      } catch {
        // closed meanwhile
      }
    }
  }
  return held;
}

/** "0100007F:1F90" (little-endian IPv4) or a 32-hex-digit IPv6 address, as "127.0.0.1:8080" or "[::1]:8080". */
export function procAddress(hex: string): { ip: string; port: number; text: string } {
  const [address = '', port = '0'] = hex.split(':');
  const portNumber = parseInt(port, 16);
  let ip: string;
  if (address.length === 8) {
    const n = parseInt(address, 16);
    ip = [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff].join('.');
  } else {
    // Four little-endian 32-bit words.
    const words: string[] = [];
    for (let i = 0; i < 32; i += 8) {
      const w = address.slice(i, i + 8);
      words.push(w.slice(6, 8) + w.slice(4, 6), w.slice(2, 4) + w.slice(0, 2));
    }
    const groups = words.map((g) => g.replace(/^0+(?=.)/, '').toLowerCase());
    ip = compressIpv6(groups);
    const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(ip);
    if (mapped?.[1] !== undefined && mapped[2] !== undefined) {
      const hi = parseInt(mapped[1], 16);
      const lo = parseInt(mapped[2], 16);
      ip = `::ffff:${hi >> 8}.${hi & 0xff}.${lo >> 8}.${lo & 0xff}`;
    }
  }
  return { ip, port: portNumber, text: ip.includes(':') ? `[${ip}]:${portNumber}` : `${ip}:${portNumber}` };
}

function compressIpv6(groups: string[]): string {
  let best = { start: -1, length: 0 };
  for (let i = 0; i < groups.length;) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < groups.length && groups[j] === '0') j++;
    if (j - i > best.length) best = { start: i, length: j - i };
    i = j;
  }
  if (best.length < 2) return groups.join(':');
  const head = groups.slice(0, best.start).join(':');
  const tail = groups.slice(best.start + best.length).join(':');
  return `${head}::${tail}`;
}

export function isWildcard(ip: string): boolean {
  return ip === '0.0.0.0' || ip === '::';
}

export function isLoopback(ip: string): boolean {
  return ip.startsWith('127.') || ip === '::1' || ip.startsWith('::ffff:127.');
}

/** The sockets of a process tree, each with whether it can move and why; `tree[0]` names its network namespace. */
export function heldSockets(tree: readonly number[], serviceIp?: string): HeldSocket[] {
  const held = heldInodes(tree);
  if (held.size === 0) return [];
  const sockets: HeldSocket[] = [];
  const inet: {
    kind: 'tcp' | 'udp';
    inode: string;
    local: ReturnType<typeof procAddress>;
    peer: ReturnType<typeof procAddress>;
    state: string;
  }[] = [];
  for (const table of ['tcp', 'tcp6', 'udp', 'udp6'] as const) {
    let text = '';
    try {
      text = readFileSync(`/proc/${tree[0]}/net/${table}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      const inode = f[9];
      if (inode === undefined || !held.has(inode)) continue;
      const state = table.startsWith('tcp') ? (TCP_STATES[parseInt(f[3] ?? '0', 16)] ?? '') : '';
      inet.push({
        kind: table.startsWith('tcp') ? 'tcp' : 'udp',
        inode,
        local: procAddress(f[1] ?? ''),
        peer: procAddress(f[2] ?? ''),
        state,
      });
    }
  }
  for (const s of inet) {
    // Both ends in the tree: the peer's tuple is this socket's, reversed, and also held.
    const peerInTree =
      s.kind === 'tcp' && inet.some((o) => o !== s && o.local.text === s.peer.text && o.peer.text === s.local.text);
    const kind: SocketKind =
      s.kind === 'udp'
        ? 'udp'
        : s.state === 'LISTEN'
          ? 'tcp-listen'
          : s.state === 'ESTABLISHED'
            ? 'tcp-established'
            : 'tcp-other';
    const connected = kind === 'tcp-established' || (kind === 'udp' && s.peer.port !== 0);
    sockets.push({
      kind,
      inode: s.inode,
      local: s.local.text,
      peer: s.peer.port === 0 ? '' : s.peer.text,
      state: s.state || (connected ? 'connected' : 'bound'),
      peerInTree,
      ...inetVerdict(kind, s.local.ip, s.peer.ip, peerInTree, serviceIp),
    });
  }
  sockets.push(...unixSockets(tree[0] ?? 0, held));
  return sockets;
}

function inetVerdict(
  kind: SocketKind,
  local: string,
  peer: string,
  peerInTree: boolean,
  serviceIp: string | undefined,
): { moves: boolean; why: string } {
  if (kind === 'tcp-other')
    return { moves: false, why: 'a TCP socket in the middle of opening or closing: wait for it to settle' };
  const own = serviceIp !== undefined && local === serviceIp;
  if (kind === 'tcp-established') {
    if (peerInTree) return { moves: true, why: 'both ends are in the process tree and move together' };
    if (isLoopback(peer)) return { moves: false, why: 'its peer is on the source host (loopback) and stays behind' };
    if (own) return { moves: true, why: `its local address ${local} is the workload's and moves with it` };
    return {
      moves: false,
      why: `its local address ${local} belongs to the source host and is not on the destination (CRIU rebinds the connection to it)`,
    };
  }
  if (own) return { moves: true, why: `bound to the workload's address ${local}, which moves with it` };
  if (isWildcard(local) || isLoopback(local)) {
    return {
      moves: true,
      why: kind === 'udp' ? 'bound to a wildcard or loopback address' : 'listening on a wildcard or loopback address',
    };
  }
  return {
    moves: false,
    why: `bound to ${local}, an address of the source host that the destination does not have (not the workload's)`,
  };
}

/** Unix sockets held, from /proc/net/unix, with their peers from ss (unix_diag). */
function unixSockets(pid: number, held: Set<string>): HeldSocket[] {
  let text = '';
  try {
    text = readFileSync(`/proc/${pid}/net/unix`, 'utf8');
  } catch {
    return [];
  }
  const found: { inode: string; type: string; state: string; path: string }[] = [];
  for (const line of text.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    const inode = f[6];
    if (inode === undefined || !held.has(inode)) continue;
    found.push({ inode, type: f[4] ?? '', state: f[5] ?? '', path: f[7] ?? '' });
  }
  if (found.length === 0) return [];
  const peers = unixPeers(pid);
  return found.map((u) => {
    const kind: SocketKind = u.type === '0002' ? 'unix-dgram' : u.type === '0005' ? 'unix-seqpacket' : 'unix-stream';
    const diag = peers.get(u.inode);
    // A connection its server has not accepted yet has no peer inode (0): its peer is still outside.
    const peer = diag === undefined || diag.state !== 'ESTAB' ? undefined : diag.peer;
    const listening = diag?.state === 'LISTEN' || (diag === undefined && u.state === '01' && u.path !== '');
    const peerInTree = peer === undefined || (peer !== '0' && held.has(peer));
    let verdict: { moves: boolean; why: string };
    if (listening) verdict = { moves: true, why: 'a listening unix socket: restored with its path' };
    else if (peerInTree)
      verdict = { moves: true, why: peer === undefined ? 'not connected' : 'both ends are in the process tree' };
    else if (kind === 'unix-dgram')
      verdict = { moves: true, why: 'a datagram peer outside the tree (reconnected by its path)' };
    else
      verdict = {
        moves: false,
        why: 'connected to a process outside the tree, which stays behind (CRIU cannot dump half a unix connection)',
      };
    return {
      kind,
      inode: u.inode,
      local: u.path,
      peer: peer === undefined ? '' : peer === '0' ? 'a connection not yet accepted' : `inode ${peer}`,
      state: listening ? 'LISTEN' : peer === undefined ? 'unconnected' : 'connected',
      peerInTree,
      ...verdict,
    };
  });
}

/** Unix socket inode → its state and its peer's inode, as the kernel reports them (ss -x), in the namespace of pid. */
function unixPeers(pid: number): Map<string, { state: string; peer: string }> {
  const peers = new Map<string, { state: string; peer: string }>();
  let out = '';
  try {
    out = execFileSync('nsenter', [`--net=/proc/${pid}/ns/net`, '--', 'ss', '-xanH'], {
      encoding: 'utf8',
      timeout: 5_000,
      stdio: ['ignore', 'pipe', 'ignore'],
    });
  } catch {
    return peers;
  }
  for (const line of out.split('\n')) {
    // Netid State Recv-Q Send-Q Local Address:Port Peer Address:Port
    const f = line.trim().split(/\s+/);
    const [, state = '', , , , local, , peer = '0'] = f;
    if (local !== undefined) peers.set(local, { state, peer });
  }
  return peers;
}
