/** A migration's states and their legal moves: the table every journal write is checked against. */
export {
  checkTransition,
  DESTINATION_TRANSITIONS,
  FINAL_STATES,
  IllegalTransitionError,
  INITIAL,
  isFinalState,
  SOURCE_TRANSITIONS,
  transitionsOf,
  type Circumstance,
  type DestinationState,
  type MigrationState,
  type Role,
  type SourceState,
  type Transition,
} from './states.js';
