//! The failover controller: Orchestrator's job inside Breakwater.
//!
//! - [`topology`]: probing servers (mysql_async, hard timeouts) into an [`topology::Instance`].
//! - [`gtid`]: MariaDB GTID positions and their comparison.
//! - [`detect`]: holistic detection (DeadPrimary vs UnreachablePrimary, DeadReplica, …).
//! - [`gate`]: can a replica carry the dead primary's load (the load-aware promotion gate).
//! - [`candidate`]: which replica to promote (promotion rules, no lost transactions, the
//!   gate's verdicts, catch-up from the most advanced replica).
//! - [`cascade`]: watching a freshly promoted primary for a cascading risk.
//! - [`journal`]: a recovery's steps, saved one by one so a restarted proxy finishes it.
//! - [`cluster`]: several proxies, one controller: the etcd election and shared state.
//! - [`state`]: what the controller decided, kept in the admin db file across restarts.
//! - [`actions`]: the SQL of a recovery and the promotion hooks.
//! - [`controller`]: the loop, recoveries, switchover, cooldown (anti-flapping), events.

pub mod actions;
pub mod candidate;
pub mod cascade;
pub mod cluster;
pub mod controller;
pub mod detect;
pub mod gate;
pub mod journal;
pub mod state;
pub mod gtid;
pub mod topology;

pub use controller::{spawn, Request, Shared, View};
