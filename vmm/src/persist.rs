//! Saving and restoring the state of the machine's parts.
//!
//! Every live object that holds guest-visible state has a plain, serializable `*State` struct
//! beside it. [`Persist::save`] captures it (the VM must be paused: no vCPU running, no device
//! event being processed); [`Persist::restore`] builds a new live object from it, given the
//! host resources the state cannot carry (guest memory, file descriptors, interrupt lines).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// An object whose state can be saved and a new object restored from it.
pub trait Persist: Sized {
    /// The saved state.
    type State: Serialize + DeserializeOwned;
    /// What the restore needs besides the state (host resources, guest memory).
    type ConstructorArgs;
    /// Why a restore failed.
    type Error;

    /// Captures the object's state.
    fn save(&self) -> Self::State;

    /// Builds a live object from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
