//! The failover controller: Orchestrator's job inside Breakwater.
//!
//! - [`topology`]: probing servers (mysql_async, hard timeouts) into an [`topology::Instance`].
//! - [`gtid`]: MariaDB GTID positions and their comparison.
//! - [`detect`]: holistic detection (DeadPrimary vs UnreachablePrimary, DeadReplica, …).
//! - [`candidate`]: which replica to promote (promotion rules, no lost transactions).
//! - [`actions`]: the SQL of a recovery and the promotion hooks.
//! - [`controller`]: the loop, recoveries, switchover, cooldown (anti-flapping), events.

pub mod actions;
pub mod candidate;
pub mod controller;
pub mod detect;
pub mod gtid;
pub mod topology;

pub use controller::{spawn, Request, Shared, View};
