//! Live migration: the wire protocol (shared with replication), the sending side (iterative
//! pre-copy from the dirty log, then stop-and-copy) and the receiving side (`vmr receive`).

pub mod destination;
pub mod source;
pub mod wire;
