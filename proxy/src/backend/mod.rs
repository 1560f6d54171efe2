//! The backend side: servers, their capped pools, connections, and health checks.
//!
//! - [`server`]: a server entry (hostgroup, weight, status, counters) owning its pool.
//! - [`pool`]: the hard cap, idle reuse, the bounded wait queue, and the [`pool::PooledConn`] guard.
//! - [`conn`]: one backend connection: login, state sync, response forwarding.
//! - [`monitor`]: health and replication-lag checks that shun and restore servers.
//! - [`hostgroup`]: choosing a server in a hostgroup.

pub mod conn;
pub mod hostgroup;
pub mod monitor;
pub mod pool;
pub mod server;
pub mod stream;
pub mod tls;
