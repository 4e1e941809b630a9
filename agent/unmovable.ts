/**
 * What a process tree holds that CRIU cannot move from here, each with the
 * reason, so that preflight refuses before the freeze instead of a dump or
 * restore failing after it (docs/files.md, "What cannot move"). Found from
 * /proc: the tree's mount namespaces and the kinds of its descriptors.
 */
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';

/** Descriptor kinds CRIU 4.2 has no dump for (criu/files-ext.c: "Can't dump file N of that type"). */
const UNSUPPORTED = ['perf_event', 'io_uring', 'bpf-map', 'bpf-prog', 'bpf_link', 'userfaultfd', 'pidfd', 'kvm'];

export function unmovable(tree: readonly number[]): string[] {
  const reasons = new Set<string>();
  const ownMnt = link('/proc/self/ns/mnt');
  for (const pid of tree) {
    const proc = `/proc/${pid}`;
    const mnt = link(`${proc}/ns/mnt`);
    if (mnt !== undefined && ownMnt !== undefined && mnt !== ownMnt) {
      reasons.add(
        `PID ${pid} runs in a mount namespace of its own (unshare -m, ip netns exec, systemd's PrivateTmp): ` +
          `CRIU 4.2 dumps it but its restore fails here ("mnt: BUG at criu/mount.c:48")`,
      );
    }
    let fds: string[] = [];
    try {
      fds = readdirSync(`${proc}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      const target = link(`${proc}/fd/${fd}`) ?? '';
      const kind = /^anon_inode:\[?([^\]]+)\]?$/.exec(target)?.[1];
      if (kind !== undefined && UNSUPPORTED.includes(kind)) {
        reasons.add(`PID ${pid} holds a ${kind} descriptor (fd ${fd}), which CRIU cannot dump`);
      }
      if (kind === 'timerfd' && periodic(`${proc}/fdinfo/${fd}`)) {
        reasons.add(
          `PID ${pid} holds a periodic timerfd (fd ${fd}): CRIU restores one whose expiry is pending, ` +
            `not yet read, disarmed (it records the time left as 0), and the timer would never fire again`,
        );
      }
      if (kind === 'inotify' && !namedByHandle(`${proc}/fdinfo/${fd}`)) {
        reasons.add(
          `PID ${pid} watches with inotify (fd ${fd}) a file system that cannot name its files by handle, ` +
            'which CRIU needs to dump the watch ("fsnotify: Can\'t dump that handle")',
        );
      }
    }
  }
  return [...reasons];
}

/** A timerfd with an interval: fdinfo's "it_interval: (S, NS)" is not zero. */
function periodic(fdinfo: string): boolean {
  const interval = /it_interval:\s*\((\d+),\s*(\d+)\)/.exec(read(fdinfo));
  return interval !== null && (interval[1] !== '0' || interval[2] !== '0');
}

/** Every watch of an inotify descriptor comes with a file handle of some bytes (fdinfo's "fhandle-bytes:N"). */
function namedByHandle(fdinfo: string): boolean {
  const watches = read(fdinfo)
    .split('\n')
    .filter((line) => line.startsWith('inotify wd:'));
  return watches.every((line) => /fhandle-bytes:[1-9a-f]/.test(line));
}

function link(path: string): string | undefined {
  try {
    return readlinkSync(path);
  } catch {
    return undefined;
  }
}

function read(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}
