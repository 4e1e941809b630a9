import { InvalidInputError } from '../../src/errors.js';
import { validateEnvelope, WireProtocolError, type MigrationRecord, type WorkloadInfo } from '../../src/wire/index.js';
import type { AgentEndpoint } from './endpoint.js';
import { connectAgent, localized } from './connect.js';

export async function runWorkload(
  endpoint: AgentEndpoint,
  name: string,
  argv: readonly string[],
  softwareVersion: string,
  placement: {
    labels?: Record<string, string>;
    pinned?: boolean;
    address?: string;
    addressHook?: string;
    carry?: readonly string[];
    shared?: readonly string[];
  } = {},
): Promise<WorkloadInfo> {
  const params = {
    name,
    argv: [...argv],
    labels: { ...placement.labels },
    pinned: placement.pinned === true,
    address: placement.address ?? '',
    addressHook: placement.addressHook ?? '',
    carry: [...(placement.carry ?? [])],
    shared: [...(placement.shared ?? [])],
  };
  // The agent would refuse it as malformed and drop the connection; here it is the user's input.
  try {
    validateEnvelope({ id: 1, runWorkload: params });
  } catch (error) {
    if (!(error instanceof WireProtocolError)) throw error;
    throw new InvalidInputError(`an agent cannot run that: ${error.message}`, {
      hint: 'at most 256 arguments of 4096 characters, 32 labels with values of 256',
    });
  }
  const agent = await connectAgent(endpoint, softwareVersion);
  try {
    return await agent.call('runWorkload', params, { timeoutMs: 30_000 });
  } catch (error) {
    throw localized(error);
  } finally {
    agent.close();
  }
}

export async function listWorkloads(endpoint: AgentEndpoint, softwareVersion: string): Promise<WorkloadInfo[]> {
  const agent = await connectAgent(endpoint, softwareVersion);
  try {
    return (await agent.call('listWorkloads', {})).workloads ?? [];
  } finally {
    agent.close();
  }
}

/** Migrations an agent's journal knows (status), or the ones it settled now (recover). */
export async function migrationRecords(
  endpoint: AgentEndpoint,
  softwareVersion: string,
  settle: boolean,
): Promise<MigrationRecord[]> {
  const agent = await connectAgent(endpoint, softwareVersion);
  try {
    const options = { timeoutMs: 120_000 };
    const list = settle ? await agent.call('recover', {}, options) : await agent.call('statusQuery', {}, options);
    return list.migrations ?? [];
  } finally {
    agent.close();
  }
}
