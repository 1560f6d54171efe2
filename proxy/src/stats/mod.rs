//! Statistics kept by the proxy beyond plain counters.
//!
//! - [`digests`]: per query digest and hostgroup (ProxySQL's stats_mysql_query_digest).

pub mod digests;
