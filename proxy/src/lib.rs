//! Breakwater's MySQL proxy.
//!
//! Where things are:
//! - [`protocol`]: MySQL packets, handshake, auth plugins, response walking.
//! - [`frontend`]: the client session loop, prepared statements, session state and pins.
//! - [`backend`]: servers, capped pools with a guard, backend connections, health monitor.
//! - [`router`]: query rules, digests, statement classification.
//! - [`listener`]: accept loop, client limit, graceful shutdown.
//! - [`failover`]: the failover controller (discovery, detection, promotion, cooldown).
//! - [`access`]: temporary access (expiring database users, audit, reconciler).
//! - [`admin`]: the admin HTTP interface (JSON API, /metrics, topology page) and its CLI client.
//! - [`cache`]: the query cache (TTL, memory bound with CLOCK (approximate LRU) eviction, single fill, invalidation by table).
//! - [`stats`]: query digest statistics.
//! - [`telemetry`]: OTLP traces (a span per sampled query) and metrics.
//! - [`config`] / [`runtime`]: the TOML configuration and what is built from it.

pub mod access;
pub mod adaptive;
pub mod admin;
pub mod backend;
pub mod cache;
pub mod config;
pub mod failover;
pub mod frontend;
pub mod listener;
pub mod protocol;
pub mod router;
pub mod runtime;
pub mod stats;
pub mod telemetry;
