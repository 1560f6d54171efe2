//! The client side: login, the per-client session loop, prepared statements, and the
//! session state the proxy tracks so a client can move between backend connections.
//!
//! - [`login`]: greeting, auth plugins, auth switch.
//! - [`session`]: one client: reads commands, routes them, forwards responses.
//! - [`executor`]: checkout, state sync, forwarding, retries.
//! - [`cache_path`]: query cache hits, fills, keys and invalidation.
//! - [`intercept`]: local answers, KILL, the query-timeout reaper.
//! - [`prepared`]: COM_STMT_* on top of multiplexed connections.
//! - [`state`]: replayable session variables and pin reasons.
//! - [`diagnostics`]: ROW_COUNT(), FOUND_ROWS(), SHOW WARNINGS … once the previous
//!   statement's connection went back to the pool.

pub mod cache_path;
pub mod diagnostics;
pub mod executor;
pub mod intercept;
pub mod login;
pub mod prepared;
pub mod session;
pub mod state;
pub mod stream;
