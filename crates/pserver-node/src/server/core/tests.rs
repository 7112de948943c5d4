//! Unit tests of the server core: inputs in, effects out.
