//! The manager's state machine: registration, leases, tables, barriers.
