//! vmr's whole-VM replication.
//!
//! - [`wire`]: the messages of an epoch stream and their authenticated, length-bounded frames;
//! - [`auth`]: the shared key and the challenge/response handshake;
//! - [`compat`]: what a VM needs of a standby, and the refusals;
//! - [`pairing`]: a primary and a standby become a [`pairing::Link`];
//! - [`epoch`]: an epoch's digest, and the writer the primary sends an epoch with;
//! - [`standby`]: staging epochs and committing them atomically, the standby host, and the
//!   takeover that makes it the primary ([`standby::takeover`]);
//! - [`primary`]: the epoch engine of the protected VM, fenced by its authority
//!   ([`primary::authority`]);
//! - [`conn`]: the stream under a link (TCP or a Unix socket);
//! - [`coordinator`]: who owns a protected VM (etcd), the term as fencing token;
//! - [`priority`]: the priority of bulk copies beside the epochs.

pub mod auth;
pub mod compat;
pub mod conn;
pub mod coordinator;
pub mod epoch;
pub mod pairing;
pub mod primary;
pub mod priority;
pub mod standby;
pub mod wire;
