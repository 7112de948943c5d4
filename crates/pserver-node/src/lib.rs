//! pserver runtime.
