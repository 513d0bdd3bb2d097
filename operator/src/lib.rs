//! cairn-operator: the reconcilers of Cairn's custom resources. Pure
//! planning steps (what to keep, when to run) live apart from the code that
//! talks to the API server and the agents, and are unit-tested alone.

pub mod retention;
pub mod schedule;
