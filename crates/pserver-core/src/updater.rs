//! The user-defined functions a server runs on a push.
//!
//! HELPER: implement the built-ins of [`crate::spec::UpdaterSpec`] and the registry.

use crate::spec::UpdaterSpec;
use std::sync::Arc;

/// What a server does with a push to one key. Implement it to add an updater;
/// register it in a [`Registry`] handed to the server.
pub trait Updater: Send + Sync + 'static {
    /// Floats of optimizer state kept per weight element (0 for none).
    fn state_len(&self) -> usize {
        0
    }

    /// Floats pushed per weight element (1 for a gradient; 2 for the
    /// proximal step, which takes the gradient and the curvature).
    fn push_len(&self) -> usize {
        1
    }

    /// Applies one key's push. `weights` has `dim` floats, `state` has
    /// `dim * state_len()` (element `i`'s state at `state[i * state_len()..]`),
    /// `push` has `dim * push_len()` (element `i`'s at `push[i * push_len()..]`).
    /// Pushed values are finite (the server checks before calling).
    fn apply(&self, weights: &mut [f32], state: &mut [f32], push: &[f32]);
}

/// Why an updater could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpdaterError {
    /// A `Custom` updater whose name nobody registered on this server.
    #[error("updater {0:?} is not registered on this server")]
    Unknown(String),
    /// The user's constructor refused the parameters.
    #[error("updater {name:?}: {message}")]
    BadParams {
        /// Updater name.
        name: String,
        /// What the constructor said.
        message: String,
    },
}

/// A constructor of a user updater from its parameters.
pub type Constructor = Arc<dyn Fn(&[f32]) -> Result<Arc<dyn Updater>, String> + Send + Sync>;

/// Maps names of user updaters to their constructors. A value, not a global:
/// each server gets its own.
#[derive(Clone, Default)]
pub struct Registry {
    // HELPER
}

impl Registry {
    /// An empty registry (built-ins need no registration).
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers a user updater under `name`.
    pub fn register(&mut self, name: &str, ctor: Constructor) {
        let _ = (name, ctor);
        todo!()
    }

    /// Builds the updater a spec names.
    pub fn build(&self, spec: &UpdaterSpec) -> Result<Arc<dyn Updater>, UpdaterError> {
        let _ = spec;
        todo!()
    }
}
