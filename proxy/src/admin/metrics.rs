//! Prometheus text for the proxy and the failover controller. Names follow Prometheus
//! conventions; labels follow OpenTelemetry's (server_address, db_system_name).

use crate::failover::Shared;
use crate::runtime::Proxy;
use std::fmt::Write;
use std::sync::atomic::Ordering;

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(proxy: &Proxy, failover: Option<&Shared>) -> String {
    let mut o = String::with_capacity(4096);
    let st = &proxy.stats;
    for (name, help, v) in [
        ("breakwater_proxy_client_connections_total", "Client connections accepted.", st.client_connections.load(Ordering::Relaxed)),
        ("breakwater_proxy_client_connections_refused_total", "Client connections refused (max_client_connections).", st.client_connections_refused.load(Ordering::Relaxed)),
        ("breakwater_proxy_backend_errors_total", "Backend connections lost during a command.", st.backend_errors.load(Ordering::Relaxed)),
        ("breakwater_proxy_read_retries_total", "Reads retried on another server.", st.retries.load(Ordering::Relaxed)),
        ("breakwater_proxy_query_timeouts_total", "Statements killed on their backend by default_query_timeout_ms.", st.query_timeouts.load(Ordering::Relaxed)),
        ("breakwater_proxy_transaction_timeouts_total", "Transactions rolled back by max_transaction_time_ms or max_transaction_idle_time_ms.", st.transaction_timeouts.load(Ordering::Relaxed)),
    ] {
        family(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name}{{db_system_name=\"mysql\"}} {v}");
    }
    let rt = proxy.runtime();
    let routing = rt.routing();
    family(&mut o, "breakwater_proxy_server_status", "gauge", "1 for the status each server entry is in (ONLINE, SHUNNED, OFFLINE_HARD).");
    family(&mut o, "breakwater_proxy_server_routed", "gauge", "1 when the entry is in its hostgroup's current routing.");
    family(&mut o, "breakwater_proxy_server_connections", "gauge", "Backend connections of a server entry by state.");
    family(&mut o, "breakwater_proxy_server_queries_total", "counter", "Commands sent to a server entry.");
    for s in rt.servers() {
        let l = format!("hostgroup=\"{}\",server_address=\"{}\"", s.cfg.hostgroup, esc(&s.addr));
        let routed = routing.hostgroups.get(&s.cfg.hostgroup).is_some_and(|h| h.servers.iter().any(|x| std::sync::Arc::ptr_eq(x, &s)));
        let _ = writeln!(o, "breakwater_proxy_server_status{{{l},status=\"{}\"}} 1", s.status().as_str());
        let _ = writeln!(o, "breakwater_proxy_server_routed{{{l}}} {}", routed as u8);
        let in_use = s.pool.in_use.load(Ordering::Relaxed);
        let _ = writeln!(o, "breakwater_proxy_server_connections{{{l},state=\"in_use\"}} {in_use}");
        let _ = writeln!(o, "breakwater_proxy_server_connections{{{l},state=\"idle\"}} {}", s.pool.idle_count());
        let _ = writeln!(o, "breakwater_proxy_server_queries_total{{{l}}} {}", s.counters.queries.load(Ordering::Relaxed));
    }
    backends(&mut o, proxy);
    let c = proxy.cache.stats();
    for (name, kind, help, v) in [
        ("breakwater_proxy_cache_hits_total", "counter", "Reads answered from the query cache.", c.hits),
        ("breakwater_proxy_cache_stale_hits_total", "counter", "Reads answered from an expired entry while it was refreshed.", c.stale_hits),
        ("breakwater_proxy_cache_stale_if_error_hits_total", "counter", "Reads answered from an expired entry because no backend could answer (stale-if-error).", c.stale_if_error_hits),
        ("breakwater_proxy_cache_misses_total", "counter", "Cacheable reads that went to a backend.", c.misses),
        ("breakwater_proxy_cache_fill_waits_total", "counter", "Reads that waited for another client's fetch of the same key.", c.fill_waits),
        ("breakwater_proxy_cache_evictions_total", "counter", "Entries evicted to stay under the memory bound.", c.evictions),
        ("breakwater_proxy_cache_invalidations_total", "counter", "Entries dropped because a write touched their tables.", c.invalidations),
        ("breakwater_proxy_cache_entries", "gauge", "Entries in the query cache.", c.entries as u64),
        ("breakwater_proxy_cache_bytes", "gauge", "Bytes held by the query cache.", c.bytes as u64),
        ("breakwater_proxy_cache_max_bytes", "gauge", "The query cache's memory bound.", c.max_bytes as u64),
        ("breakwater_proxy_digests", "gauge", "Rows in the query digest table.", proxy.digests.len() as u64),
        ("breakwater_proxy_digests_evicted_total", "counter", "Digest rows evicted to keep the table bounded.", proxy.digests.evicted()),
        (
            "breakwater_proxy_statements_shed_total",
            "counter",
            "Statements refused because their query rule's shed_priority is shed under a cascading risk.",
            proxy.rt.shedding.shed.load(std::sync::atomic::Ordering::Relaxed),
        ),
    ] {
        family(&mut o, name, kind, help);
        let _ = writeln!(o, "{name}{{db_system_name=\"mysql\"}} {v}");
    }
    let Some(f) = failover else { return o };
    let v = f.view();
    let c = format!("cluster=\"{}\"", esc(&v.cluster));
    family(&mut o, "breakwater_failover_detections_total", "counter", "Problems detected, by kind (DeadPrimary, UnreachablePrimary, DeadReplica, ...).");
    for (k, n) in &v.counters.detections {
        let _ = writeln!(o, "breakwater_failover_detections_total{{{c},kind=\"{k}\"}} {n}");
    }
    family(&mut o, "breakwater_failover_recoveries_total", "counter", "Recoveries run, by kind (automated, manual, switchover) and result.");
    for (k, n) in &v.counters.recoveries {
        let (kind, result) = k.split_once('/').unwrap_or((k, ""));
        let _ = writeln!(o, "breakwater_failover_recoveries_total{{{c},kind=\"{kind}\",result=\"{result}\"}} {n}");
    }
    family(&mut o, "breakwater_failover_recoveries_blocked_total", "counter", "Automated recoveries not run because of the cooldown.");
    let _ = writeln!(o, "breakwater_failover_recoveries_blocked_total{{{c}}} {}", v.counters.blocked);
    family(&mut o, "breakwater_failover_acknowledgements_total", "counter", "Recoveries acknowledged by a person.");
    let _ = writeln!(o, "breakwater_failover_acknowledgements_total{{{c}}} {}", v.counters.acks);
    family(&mut o, "breakwater_failover_cooldown_active", "gauge", "1 while automated recoveries are blocked (RecoveryPeriodBlockSeconds).");
    let _ = writeln!(o, "breakwater_failover_cooldown_active{{{c}}} {}", v.cooldown.active as u8);
    family(&mut o, "breakwater_failover_cooldown_remaining_seconds", "gauge", "Seconds left in the cooldown.");
    let _ = writeln!(o, "breakwater_failover_cooldown_remaining_seconds{{{c}}} {}", v.cooldown.remaining_seconds);
    family(&mut o, "breakwater_failover_semisync_active", "gauge", "1 while the primary's commits wait for a replica's acknowledgement (Rpl_semi_sync_master_status ON).");
    let semi = v.servers.iter().find(|s| s.role == "primary").is_some_and(|s| s.instance.semi_sync_master_status == Some(true));
    let _ = writeln!(o, "breakwater_failover_semisync_active{{{c}}} {}", semi as u8);
    family(&mut o, "breakwater_failover_cascading_risk", "gauge", "1 while a cascading risk is raised on a freshly promoted primary.");
    let _ = writeln!(o, "breakwater_failover_cascading_risk{{{c}}} {}", v.cascading_risk.is_some() as u8);
    family(&mut o, "breakwater_failover_cascading_risks_total", "counter", "Cascading risks raised on freshly promoted primaries.");
    let _ = writeln!(o, "breakwater_failover_cascading_risks_total{{{c}}} {}", v.counters.cascading_risks);
    family(&mut o, "breakwater_failover_promotion_held", "gauge", "1 while automated promotion is held until a person acknowledges (after a cascading risk).");
    let _ = writeln!(o, "breakwater_failover_promotion_held{{{c}}} {}", v.promotion_hold.is_some() as u8);
    family(&mut o, "breakwater_failover_unfit_candidates_total", "counter", "Promotion candidates the load gate judged unable to carry the primary's load.");
    let _ = writeln!(o, "breakwater_failover_unfit_candidates_total{{{c}}} {}", v.counters.unfit_candidates);
    family(&mut o, "breakwater_failover_leader", "gauge", "1 while this proxy runs detection and recovery for the cluster (always 1 without etcd).");
    let _ = writeln!(o, "breakwater_failover_leader{{{c}}} {}", v.leader as u8);
    if v.cluster_status.mode == "etcd" {
        family(&mut o, "breakwater_failover_etcd_up", "gauge", "1 while this proxy's last etcd round (renew, campaign, read) succeeded.");
        let _ = writeln!(o, "breakwater_failover_etcd_up{{{c}}} {}", v.cluster_status.etcd_reachable as u8);
        family(&mut o, "breakwater_failover_leader_terms_total", "counter", "Times this proxy became the leader.");
        let _ = writeln!(o, "breakwater_failover_leader_terms_total{{{c}}} {}", v.cluster_status.terms);
    }
    family(&mut o, "breakwater_failover_recovery_step", "gauge", "1 for the last saved step of a recovery or switchover in progress (all 0 when none).");
    for st in crate::failover::journal::Step::ALL {
        let on = v.recovery_in_progress.as_ref().is_some_and(|j| j.step == st);
        let _ = writeln!(o, "breakwater_failover_recovery_step{{{c},step=\"{}\"}} {}", st.as_str(), on as u8);
    }
    family(&mut o, "breakwater_failover_writes_blocked", "gauge", "1 while the proxy refuses or holds writes for this cluster.");
    let _ = writeln!(o, "breakwater_failover_writes_blocked{{{c}}} {}", (v.writer_gate != "open") as u8);
    if let Some(r) = &v.last_recovery {
        family(&mut o, "breakwater_failover_last_recovery_duration_seconds", "gauge", "Detection to new primary taking writes, last recovery.");
        let _ = writeln!(o, "breakwater_failover_last_recovery_duration_seconds{{{c},kind=\"{}\"}} {:.3}", r.kind, r.duration_ms as f64 / 1000.0);
        family(&mut o, "breakwater_failover_last_write_pause_seconds", "gauge", "How long writes were held during the last recovery.");
        let _ = writeln!(o, "breakwater_failover_last_write_pause_seconds{{{c},kind=\"{}\"}} {:.3}", r.kind, r.write_pause_ms as f64 / 1000.0);
    }
    family(&mut o, "breakwater_failover_server_up", "gauge", "1 when the controller's probe reached the server.");
    family(&mut o, "breakwater_failover_server_role", "gauge", "1 for the server's role (primary, replica, fenced, detached, unknown).");
    family(&mut o, "breakwater_replication_lag_seconds", "gauge", "Seconds_Behind_Master of each replica (absent when NULL).");
    for s in &v.servers {
        let l = format!("{c},server_address=\"{}\"", esc(&s.instance.addr));
        let _ = writeln!(o, "breakwater_failover_server_up{{{l}}} {}", s.instance.reachable as u8);
        let _ = writeln!(o, "breakwater_failover_server_role{{{l},role=\"{}\"}} 1", s.role);
        if let Some(lag) = s.instance.replication.as_ref().and_then(|r| r.seconds_behind_master) {
            let _ = writeln!(o, "breakwater_replication_lag_seconds{{{l}}} {lag}");
        }
    }
    o
}

/// The health and load view per backend (`adaptive::view`), and the OTLP receiver's counts.
fn backends(o: &mut String, proxy: &Proxy) {
    for (name, help, v) in [
        ("breakwater_proxy_signals_accepted_total", "OTLP metrics requests from agents taken.", proxy.signals.accepted.load(Ordering::Relaxed)),
        ("breakwater_proxy_signals_rejected_total", "OTLP metrics requests refused (bad payload, size, type).", proxy.signals.rejected.load(Ordering::Relaxed)),
    ] {
        family(o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
    }
    let rows = crate::adaptive::view::backends(proxy);
    let gauges: [(&str, &str, fn(&crate::adaptive::view::BackendRow) -> Option<f64>); 11] = [
        ("breakwater_proxy_backend_ejected", "1 while the server is out of adaptive reader choice after an error burst.", |b| Some(b.ejected as u8 as f64)),
        ("breakwater_proxy_backend_signal_fresh", "1 while a fresh agent series feeds the server (signal_source agent+proxy).", |b| Some((b.signal_source != "proxy") as u8 as f64)),
        ("breakwater_proxy_backend_agent_age_seconds", "Age of the agent's last report for the server.", |b| b.agent_age_ms.map(|v| v as f64 / 1e3)),
        ("breakwater_proxy_backend_server_latency_p99_seconds", "Server-side p99 request latency reported by the agent (recent window).", |b| b.server_latency_p99_ms.map(|v| v / 1e3)),
        ("breakwater_proxy_backend_server_in_flight", "Requests in flight on the server, as the agent sees them.", |b| b.server_in_flight.map(|v| v as f64)),
        ("breakwater_proxy_backend_cpu_pressure_ratio", "CPU pressure (PSI some avg10) of the server's cgroup.", |b| b.cpu_pressure),
        ("breakwater_proxy_backend_latency_seconds", "The proxy's own latency average for the server (peak EWMA).", |b| Some(b.proxy_latency_ms / 1e3)),
        ("breakwater_proxy_backend_in_flight", "Statements the proxy has in flight on the server.", |b| Some(b.in_flight as f64)),
        ("breakwater_proxy_backend_queued", "Statements waiting for the server's concurrency limit or a connection.", |b| Some(b.queued as f64)),
        ("breakwater_proxy_backend_concurrency_limit", "The server's adaptive concurrency limit (statements in flight).", |b| b.concurrency_limit.map(|v| v as f64)),
        ("breakwater_proxy_backend_read_share_ratio", "The server's share of its hostgroup's statements over the last 5 s.", |b| Some(b.read_share)),
    ];
    family(o, "breakwater_proxy_backend_shed_total", "counter", "Statements refused by the server's concurrency limit (queue full or deadline passed).");
    for b in &rows {
        let _ = writeln!(o, "breakwater_proxy_backend_shed_total{{hostgroup=\"{}\",server_address=\"{}:{}\"}} {}", b.hostgroup, esc(&b.srv_host), b.srv_port, b.shed_total);
    }
    family(o, "breakwater_proxy_backend_ejections_total", "counter", "Outlier ejections of the server after backend failures in a row.");
    for b in &rows {
        let _ = writeln!(o, "breakwater_proxy_backend_ejections_total{{hostgroup=\"{}\",server_address=\"{}:{}\"}} {}", b.hostgroup, esc(&b.srv_host), b.srv_port, b.ejections_total);
    }
    for (name, help, f) in gauges {
        family(o, name, "gauge", help);
        for b in &rows {
            if let Some(v) = f(b) {
                let _ = writeln!(o, "{name}{{hostgroup=\"{}\",server_address=\"{}:{}\"}} {v}", b.hostgroup, esc(&b.srv_host), b.srv_port);
            }
        }
    }
}
