//! The admin interfaces: the MySQL-protocol one ([`mysql`], [`tables`]: ProxySQL-style
//! tables on `[admin] mysql_listen`, default 127.0.0.1:6032) and a small HTTP/1.1 server on `[admin] listen` (default
//! 127.0.0.1:6070) with the failover JSON API, Prometheus /metrics and the topology page,
//! and the client the `breakwater-proxy failover …` commands use.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /api/failover | topology, problems, cooldown, last recovery, events (JSON) |
//! | GET | /api/failover/events | events only |
//! | POST | /api/failover/switchover?to=HOST:PORT | graceful switchover (to is optional) |
//! | POST | /api/failover/failover?to=HOST:PORT | manual failover of a dead primary, ignores the cooldown |
//! | POST | /api/failover/ack?by=NAME | acknowledge: ends the cooldown block |
//! | POST | /api/failover/rejoin?addr=HOST:PORT | a fenced former primary replicates again |
//! | GET | /topology | the HTML topology page (refreshes itself every second) |
//! | GET | /metrics | Prometheus text |
//! | GET | /healthz | ok |
//! | GET | /readyz | 200 when every hostgroup has an ONLINE server, else 503 |
//! | GET | /api/cache | query cache statistics |
//! | GET | /api/digests | query digest statistics (stats_mysql_query_digest) |
//! | POST | /api/digests/reset | empty the digest table |

pub mod client;
pub mod http;
pub mod metrics;
pub mod mysql;
pub mod otlp_receiver;
pub mod tables;
