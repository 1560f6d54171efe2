//! Holistic failure detection, as Orchestrator does it: the controller's own view of the
//! primary is not enough to call it dead; the replicas must agree.
//!
//! - DeadPrimary: the primary does not answer AND every reachable replica of it reports its
//!   IO thread broken or reconnecting. Recovery is warranted.
//! - UnreachablePrimary: the primary does not answer but some replica still replicates from
//!   it (a network problem between the controller and the primary). Alert, no promotion.
//! - UnreachablePrimaryWithoutReplicas: the primary and all its replicas are out of sight:
//!   nothing can be decided, nothing is done.
//! - DeadReplica, BrokenReplication, LaggingReplica, ErrantTransactions, ReadOnlyPrimary,
//!   WritableFencedServer: per-server problems.

use super::gtid::{Position, State};
use super::topology::Instance;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Kind {
    DeadPrimary,
    UnreachablePrimary,
    UnreachablePrimaryWithoutReplicas,
    ReadOnlyPrimary,
    DeadReplica,
    BrokenReplication,
    LaggingReplica,
    ErrantTransactions,
    WritableFencedServer,
    /// Semi-sync is enabled on the primary but it fell back to asynchronous replication
    /// (no replica acknowledged in time): acknowledged commits may exist on it alone.
    SemiSyncFallback,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::DeadPrimary => "DeadPrimary",
            Kind::UnreachablePrimary => "UnreachablePrimary",
            Kind::UnreachablePrimaryWithoutReplicas => "UnreachablePrimaryWithoutReplicas",
            Kind::ReadOnlyPrimary => "ReadOnlyPrimary",
            Kind::DeadReplica => "DeadReplica",
            Kind::BrokenReplication => "BrokenReplication",
            Kind::LaggingReplica => "LaggingReplica",
            Kind::ErrantTransactions => "ErrantTransactions",
            Kind::WritableFencedServer => "WritableFencedServer",
            Kind::SemiSyncFallback => "SemiSyncFallback",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub kind: Kind,
    /// The server the problem is about.
    pub addr: String,
    /// What was observed, one fact per line.
    pub evidence: Vec<String>,
}

/// The replicas of `primary` among reachable, non-fenced servers.
pub fn replicas_of<'a>(primary: &str, instances: &'a BTreeMap<String, Instance>, fenced: &BTreeSet<String>) -> Vec<&'a Instance> {
    instances
        .values()
        .filter(|i| i.addr != primary && i.reachable && !fenced.contains(&i.addr))
        .filter(|i| i.replication.as_ref().is_some_and(|r| r.master_addr() == primary))
        .collect()
}

pub fn detect(primary: &str, instances: &BTreeMap<String, Instance>, fenced: &BTreeSet<String>, lag_alert_seconds: i64) -> Vec<Problem> {
    let mut out = Vec::new();
    let replicas = replicas_of(primary, instances, fenced);
    match instances.get(primary) {
        Some(p) if p.reachable => {
            if p.read_only {
                out.push(Problem { kind: Kind::ReadOnlyPrimary, addr: primary.into(), evidence: vec!["@@read_only = 1 on the primary".into()] });
            }
            if p.semi_sync_master && p.semi_sync_master_status == Some(false) {
                out.push(Problem {
                    kind: Kind::SemiSyncFallback,
                    addr: primary.into(),
                    evidence: vec![format!(
                        "rpl_semi_sync_master_enabled = 1 but Rpl_semi_sync_master_status = OFF ({} semi-sync replicas connected): commits are acknowledged before any replica has them",
                        p.semi_sync_clients.unwrap_or(0)
                    )],
                });
            }
            for r in &replicas {
                let errant = errant(p, r);
                if !errant.is_empty() {
                    out.push(Problem { kind: Kind::ErrantTransactions, addr: r.addr.clone(), evidence: errant });
                }
            }
        }
        _ => {
            let why = instances.get(primary).and_then(|p| p.error.clone()).unwrap_or_else(|| "never probed".into());
            let mut evidence = vec![format!("primary {primary} unreachable from the controller: {why}")];
            for r in &replicas {
                let repl = r.replication.as_ref();
                evidence.push(format!(
                    "replica {}: IO thread {}{}",
                    r.addr,
                    repl.map(|x| x.io_running.as_str()).unwrap_or("?"),
                    repl.filter(|x| !x.last_io_error.is_empty()).map(|x| format!(" ({})", x.last_io_error)).unwrap_or_default()
                ));
            }
            let kind = if replicas.is_empty() {
                Kind::UnreachablePrimaryWithoutReplicas
            } else if replicas.iter().all(|r| r.replication.as_ref().is_some_and(|x| !x.io_ok())) {
                Kind::DeadPrimary
            } else {
                Kind::UnreachablePrimary
            };
            out.push(Problem { kind, addr: primary.into(), evidence });
        }
    }
    for i in instances.values().filter(|i| i.addr != primary) {
        if fenced.contains(&i.addr) {
            if i.reachable && !i.read_only {
                out.push(Problem {
                    kind: Kind::WritableFencedServer,
                    addr: i.addr.clone(),
                    evidence: vec![format!("{} is fenced (a former primary) but @@read_only = 0", i.addr)],
                });
            }
            continue;
        }
        if !i.reachable {
            out.push(Problem {
                kind: Kind::DeadReplica,
                addr: i.addr.clone(),
                evidence: vec![format!("unreachable: {}", i.error.clone().unwrap_or_default())],
            });
            continue;
        }
        let Some(r) = &i.replication else { continue };
        // A broken IO thread towards a dead primary is part of DeadPrimary, not a replica fault.
        let primary_down = instances.get(primary).is_none_or(|p| !p.reachable);
        if !r.sql_ok() || (!r.io_ok() && !primary_down) {
            out.push(Problem {
                kind: Kind::BrokenReplication,
                addr: i.addr.clone(),
                evidence: vec![format!(
                    "IO {} SQL {} from {}{}{}",
                    r.io_running,
                    r.sql_running,
                    r.master_addr(),
                    if r.last_io_error.is_empty() { String::new() } else { format!("; IO error: {}", r.last_io_error) },
                    if r.last_sql_error.is_empty() { String::new() } else { format!("; SQL error: {}", r.last_sql_error) },
                )],
            });
        } else if let Some(lag) = r.seconds_behind_master.filter(|l| *l > lag_alert_seconds) {
            out.push(Problem { kind: Kind::LaggingReplica, addr: i.addr.clone(), evidence: vec![format!("Seconds_Behind_Master = {lag}")] });
        }
    }
    out
}

/// Transactions that originated on the replica itself and that the primary does not have.
/// Transactions a replica has that its primary lacks, over every GTID domain and server id
/// (`@@gtid_binlog_state`). The primary's own server id is left out: its newest writes may
/// reach the replica between the two probes. Without binlog states (an older server), the
/// last GTID per domain written under the replica's own server id.
pub fn errant(primary: &Instance, replica: &Instance) -> Vec<String> {
    if let (Ok(p), Ok(r)) = (State::parse(&primary.gtid_binlog_state), State::parse(&replica.gtid_binlog_state)) {
        if !r.pairs.is_empty() {
            return r.beyond(&p, &[primary.server_id]).into_iter().map(|t| format!("{t} on the replica, not on the primary")).collect();
        }
    }
    let (Ok(p), Ok(r)) = (Position::parse(&primary.gtid_binlog_pos), Position::parse(&replica.gtid_binlog_pos)) else {
        return Vec::new();
    };
    r.domains
        .values()
        .filter(|g| g.server == replica.server_id && p.domains.get(&g.domain).is_none_or(|pg| pg.seq < g.seq))
        .map(|g| format!("{}-{}-{} written on the replica, not on the primary ({})", g.domain, g.server, g.seq, primary.gtid_binlog_pos))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::topology::Replication;

    fn primary(addr: &str, up: bool) -> Instance {
        Instance { addr: addr.into(), reachable: up, server_id: 7, gtid_binlog_pos: "0-7-100".into(), ..Default::default() }
    }

    fn replica(addr: &str, master: &str, io: &str) -> Instance {
        let (h, p) = master.rsplit_once(':').unwrap();
        Instance {
            addr: addr.into(),
            reachable: true,
            read_only: true,
            server_id: 8,
            gtid_binlog_pos: "0-7-100".into(),
            replication: Some(Replication {
                master_host: h.into(),
                master_port: p.parse().unwrap(),
                io_running: io.into(),
                sql_running: "Yes".into(),
                seconds_behind_master: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn map(v: Vec<Instance>) -> BTreeMap<String, Instance> {
        v.into_iter().map(|i| (i.addr.clone(), i)).collect()
    }

    const P: &str = "h:1";

    #[test]
    fn semi_sync_fallback_is_reported() {
        let mut p = primary(P, true);
        p.semi_sync_master = true;
        p.semi_sync_master_status = Some(true);
        let m = map(vec![p.clone(), replica("h:2", P, "Yes")]);
        assert!(detect(P, &m, &Default::default(), 10).is_empty(), "semi-sync working");
        p.semi_sync_master_status = Some(false);
        p.semi_sync_clients = Some(0);
        let m = map(vec![p, replica("h:2", P, "Yes")]);
        let d = detect(P, &m, &Default::default(), 10);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].kind, Kind::SemiSyncFallback);
        assert!(d[0].evidence[0].contains("0 semi-sync replicas connected"), "{:?}", d[0].evidence);
    }

    #[test]
    fn healthy_cluster_has_no_problems() {
        let m = map(vec![primary(P, true), replica("h:2", P, "Yes"), replica("h:3", P, "Yes")]);
        assert!(detect(P, &m, &Default::default(), 10).is_empty());
    }

    #[test]
    fn dead_primary_needs_every_replica_to_agree() {
        let m = map(vec![primary(P, false), replica("h:2", P, "Connecting"), replica("h:3", P, "No")]);
        let p = detect(P, &m, &Default::default(), 10);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].kind, Kind::DeadPrimary);
        assert_eq!(p[0].evidence.len(), 3);

        let m = map(vec![primary(P, false), replica("h:2", P, "Connecting"), replica("h:3", P, "Yes")]);
        assert_eq!(detect(P, &m, &Default::default(), 10)[0].kind, Kind::UnreachablePrimary);

        let mut gone = replica("h:2", P, "Yes");
        gone.reachable = false;
        let m = map(vec![primary(P, false), gone]);
        let kinds: Vec<Kind> = detect(P, &m, &Default::default(), 10).iter().map(|p| p.kind).collect();
        assert_eq!(kinds, vec![Kind::UnreachablePrimaryWithoutReplicas, Kind::DeadReplica]);
    }

    #[test]
    fn lag_alone_is_not_a_failure() {
        let mut r = replica("h:2", P, "Yes");
        r.replication.as_mut().unwrap().seconds_behind_master = Some(99);
        let m = map(vec![primary(P, true), r]);
        let p = detect(P, &m, &Default::default(), 10);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].kind, Kind::LaggingReplica);
    }

    #[test]
    fn errant_and_fenced() {
        let mut r = replica("h:2", P, "Yes");
        r.gtid_binlog_pos = "0-8-101".into();
        let mut old = primary("h:9", true);
        old.read_only = false;
        let m = map(vec![primary(P, true), r, old]);
        let fenced: BTreeSet<String> = ["h:9".to_string()].into();
        let kinds: Vec<Kind> = detect(P, &m, &fenced, 10).iter().map(|p| p.kind).collect();
        assert_eq!(kinds, vec![Kind::ErrantTransactions, Kind::WritableFencedServer]);
    }

    #[test]
    fn errant_over_every_domain_and_server_id() {
        let mut p = primary(P, true);
        p.gtid_binlog_state = "0-6-50,0-7-100".into();
        let mut r = replica("h:2", P, "Yes");
        // Behind, and one newer write of the primary's (raced the probes): not errant.
        r.gtid_binlog_state = "0-6-50,0-7-101".into();
        assert!(errant(&p, &r).is_empty());
        // Written on the replica in another domain: errant, though the domain-0 position is fine.
        r.gtid_binlog_state = "0-6-50,0-7-99,5-8-2".into();
        let e = errant(&p, &r);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("5-8-1..2"), "{e:?}");
        // Under an old primary's server id the current primary never had.
        r.gtid_binlog_state = "0-6-51,0-7-99".into();
        assert!(errant(&p, &r)[0].starts_with("0-6-51..51"));
    }
}
