import { parseServiceAddress } from '../src/address.js';
import { InvalidInputError } from '../src/errors.js';
import { log } from '../src/log.js';
import type { BodyOf, ReplyOf } from '../src/wire/index.js';
import type { AgentContext } from './context.js';
import { unchanged } from './errors.js';

/**
 * `ferry run` on this node: the workload's service address first (so the
 * command can bind to it), then the command. A command that does not start
 * takes its address away again: a failed run changes nothing.
 */
export async function runWorkload(context: AgentContext, r: BodyOf<'runWorkload'>): Promise<ReplyOf<'runWorkload'>> {
  const { addresses, workloads, node } = context;
  const address = r.address ? parseServiceAddress(r.address) : undefined;
  const hook = r.addressHook ?? '';
  if (hook !== '' && address === undefined) {
    throw unchanged(new InvalidInputError('an address hook needs an address', { hint: 'add --address IP/PREFIX' }));
  }
  if (hook !== '') {
    const problem = addresses.hookProblem(hook);
    if (problem !== '') throw unchanged(new InvalidInputError(problem, { hint: 'give the hook’s absolute path' }));
  }
  let device: string | undefined;
  if (address !== undefined) {
    const problem = await addresses.problem(address);
    if (problem !== '') {
      throw unchanged(
        new InvalidInputError(
          `cannot give ${address.cidr} to the workload on ${node}: ${problem.replace(' there', ' here')}`,
          {
            hint: 'pick an address no host uses yet, in a subnet this node is on',
          },
        ),
      );
    }
    device = await addresses.add(address);
    addresses.announce(address, device);
  }
  try {
    const w = await workloads.run(r.name ?? '', r.argv ?? [], {
      labels: r.labels ?? {},
      pinned: r.pinned === true,
      address: address?.cidr,
      addressHook: hook,
      carry: r.carry ?? [],
      shared: r.shared ?? [],
    });
    log.info('workload started', { name: w.name, pid: w.pid, address: address?.cidr });
    return { ...w, state: 'running', agent: node, address: w.address ?? '' };
  } catch (error) {
    if (address !== undefined && device !== undefined) await addresses.remove(address, device).catch(() => undefined);
    throw error;
  }
}
