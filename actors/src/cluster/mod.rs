//! The model's units as ractor actors placed across processes: the control plane (membership, the shared
//! secret, node-down events) on ractor_cluster, hidden states on a framed TCP data link.

pub mod control;
pub mod link;
pub mod node;
pub mod runtime;
pub mod scheduler;
pub mod units;
pub mod wire;
