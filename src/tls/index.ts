export {
  createAuthority,
  loadAuthority,
  issueIdentity,
  AuthorityError,
  type Authority,
  type IssueRequest,
} from './authority.js';
export {
  loadIdentity,
  writePrivate,
  peerOf,
  serverOptions,
  clientOptions,
  IdentityError,
  ROLE_UNIT,
  type Identity,
  type Peer,
  type Role,
} from './identity.js';
