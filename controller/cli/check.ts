import {
  CRIU_FLOOR,
  CriuService,
  meetsCriuFloor,
  LAZY_PIPE_BYTES,
  lazyPipeLimits,
  resolveCriuBinary,
  type CriuFeatures,
  type CriuSource,
} from '../../src/criu/index.js';

export interface CheckReport {
  criu: { path: string; source: CriuSource; version: string; floor: string; meetsFloor: boolean };
  features: CriuFeatures;
  /** What Ferry can do on this machine, with the reason. */
  strategies: { precopy: boolean; stopAndCopy: boolean; reason: string };
  /**
   * Whether post-copy can work here, from what is known to break it; a
   * migration's preflight still probes it for real (docs/postcopy.md).
   */
  postcopy: { possible: boolean; reason: string };
}

/** Which CRIU Ferry uses here, whether it works, and what this kernel supports. */
export async function runCheck(options: { criu?: string | undefined; signal?: AbortSignal }): Promise<CheckReport> {
  const binary = resolveCriuBinary(options.criu);
  const service = await CriuService.start({ binary, signal: options.signal });
  try {
    const client = service.client();
    const version = await client.version({ signal: options.signal });
    await client.check({ signal: options.signal });
    const features = await client.featureCheck({ signal: options.signal });
    return {
      criu: {
        path: binary.path,
        source: binary.source,
        version: version.text,
        floor: CRIU_FLOOR.text,
        meetsFloor: meetsCriuFloor(version.text),
      },
      features,
      strategies: {
        precopy: features.memTrack,
        stopAndCopy: true,
        reason: features.memTrack
          ? 'the kernel tracks dirty memory: live pre-copy is available'
          : 'the kernel does not track dirty memory (no CONFIG_MEM_SOFT_DIRTY): only stop-and-copy',
      },
      postcopy: postcopyOutlook(features),
    };
  } finally {
    await service.stop();
  }
}

function postcopyOutlook(features: CriuFeatures): CheckReport['postcopy'] {
  if (!features.lazyPages) return { possible: false, reason: 'no non-cooperative userfaultfd in this kernel' };
  const limits = lazyPipeLimits();
  if (!limits.ok) {
    return {
      possible: false,
      reason:
        `CRIU's lazy page server needs ${LAZY_PIPE_BYTES}-byte pipes; fs.pipe-max-size is ${limits.pipeMaxSize} ` +
        `and there is no CAP_SYS_RESOURCE (sysctl -w fs.pipe-max-size=${LAZY_PIPE_BYTES} fixes it)`,
    };
  }
  return {
    possible: true,
    reason: 'userfaultfd and pipe sizes allow it; `ferry migrate --strategy postcopy` probes it for real',
  };
}

export function printCheck(report: CheckReport): void {
  const yes = (b: boolean): string => (b ? 'yes' : 'no');
  const lines = [
    `CRIU        ${report.criu.version} (${report.criu.source}: ${report.criu.path})`,
    `floor       ${report.criu.floor}: ${report.criu.meetsFloor ? 'met' : `NOT met: TCP and UDP sockets cannot move on Linux 6.16+ (scripts/install-criu installs ${report.criu.floor} or newer)`}`,
    `criu check  passed`,
    `mem_track   ${yes(report.features.memTrack)}`,
    `lazy_pages  ${yes(report.features.lazyPages)}`,
    `pidfd_store ${yes(report.features.pidfdStore)}`,
    `strategies  ${report.strategies.precopy ? 'precopy, ' : ''}stop-and-copy: ${report.strategies.reason}`,
    `post-copy   ${report.postcopy.possible ? 'possible' : 'not here'}: ${report.postcopy.reason}`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
}
