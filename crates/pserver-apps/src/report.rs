//! HELPER: see the task.
