//! Training data for pserver, read as a stream. HELPER: see the task.
