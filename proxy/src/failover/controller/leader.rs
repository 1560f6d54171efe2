//! Leading or following. Without `[cluster]` this proxy leads alone and its state lives in
//! the admin db file. With etcd, each round either
//! - leads: a newly elected leader first adopts the shared state (and takes up a recovery
//!   the previous leader left), then runs the full poll (discovery, detection, recovery)
//!   and writes every change of its state to etcd, each recovery step before the next; or
//! - follows: probes and samples (so that it can judge candidates the moment it is
//!   elected), applies the leader's decisions (writer, readers, fenced, cooldown, hold, a
//!   refusal of writes, a recovery in progress) to its routing, and acts on no server.

use super::{now_ms, Controller};
use crate::backend::hostgroup::Gate;
use crate::failover::cluster::{Cluster, Status};
use crate::failover::journal::Step;
use crate::failover::state::Persisted;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{error, warn};

impl Controller {
    /// One poll, as the leader or as a follower.
    pub(super) async fn round(&mut self) {
        if let Some(cl) = self.cluster.clone() {
            self.take_office(&cl).await;
        }
        if self.may_act() {
            self.tick().await;
        } else {
            self.follow().await;
        }
        self.polls += 1;
        let _ = self.persist().await;
    }

    /// Newly elected (a new term): adopt the shared state, then take up an unfinished
    /// recovery. Until the state is read this proxy does not act (`may_act`).
    async fn take_office(&mut self, cl: &Cluster) {
        let st = cl.status();
        if st.leader && self.term != st.terms {
            // Newly elected: the shared state first; acting without it could undo the
            // previous leader's decisions.
            match cl.load().await {
                Ok(shared) => {
                    if let Some((rev, p)) = shared {
                        self.applied_rev = rev;
                        self.adopt(p);
                    }
                    self.term = st.terms;
                    self.etcd_saved = None;
                    let p = self.primary.clone();
                    let evidence = vec![format!("{} won the etcd election (term {} of this process)", st.me, st.terms)];
                    self.event("LeaderElected", &p, evidence, "this proxy runs detection and recovery for the cluster");
                    self.resume().await;
                }
                Err(e) => warn!(error = %e, "cluster: elected, but the shared state cannot be read: following until it can"),
            }
        }
    }

    /// Whether this proxy may act on servers now: alone, or the leader whose term's state
    /// it adopted, with its lease surely alive.
    pub(super) fn may_act(&self) -> bool {
        match &self.cluster {
            None => true,
            Some(c) => c.is_leader() && self.term == c.terms(),
        }
    }

    /// Why a command is refused on a follower.
    pub(super) fn not_leader(&self) -> String {
        let s = self.cluster_status();
        let to = match (s.leader_name, s.leader_admin) {
            (Some(n), Some(a)) => format!("send it to the leader, {n} (admin {a})"),
            _ => "no leader is elected now (is etcd reachable?)".into(),
        };
        format!("this proxy ({}) is not the leader of cluster {}: {to}", s.me, self.cfg.cluster)
    }

    pub(super) fn cluster_status(&self) -> Status {
        match &self.cluster {
            Some(c) => {
                let mut s = c.status();
                s.leader = s.leader && self.term == s.terms;
                s
            }
            None => Status { mode: "single".into(), me: "this proxy".into(), leader: true, leader_name: Some("this proxy".into()), ..Default::default() },
        }
    }

    /// Follow the leader: probe, sample, apply its latest decisions.
    async fn follow(&mut self) {
        self.observe().await;
        let shared = self.shared_rx.as_ref().and_then(|rx| rx.borrow().clone());
        if let Some((rev, p)) = shared {
            if rev != self.applied_rev {
                self.applied_rev = rev;
                if p.primary != self.primary && !p.primary.is_empty() {
                    let e = vec![format!("{} -> {}", self.primary, p.primary)];
                    self.event("LeaderDecision", &p.primary.clone(), e, format!("writer hostgroup {} routes to {}", self.cfg.writer_hostgroup, p.primary));
                }
                self.adopt(p);
            }
        }
        self.apply_decisions();
    }

    /// Take a state as this controller's own (a new leader's, or a follower's copy).
    fn adopt(&mut self, p: Persisted) {
        if !p.primary.is_empty() {
            self.primary = p.primary;
        }
        self.fenced = p.fenced;
        self.cooldown_until = (p.cooldown_until_ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(p.cooldown_until_ms));
        self.hold = p.hold;
        self.refused = p.refused;
        self.journal = p.journal;
        self.writer_block = p.writer_block;
        self.leader_readers = p.readers;
    }

    /// A follower's routing: hold writes while the leader's recovery has not switched yet,
    /// else writes to the leader's primary, no fenced server anywhere, writes refused with
    /// the leader's reason when it refuses them.
    fn apply_decisions(&mut self) {
        let (whg, rhg) = (self.cfg.writer_hostgroup, self.cfg.reader_hostgroup);
        if let Some(j) = self.journal.as_ref().filter(|j| j.step < Step::Switched) {
            let why = format!("failover of {} in progress (by the leader)", j.failed);
            self.rt.set_gate(whg, Gate::Hold(why.into()));
            return;
        }
        if self.primary.is_empty() {
            return;
        }
        let routing = self.rt.routing();
        let addrs = |hg: u32| -> BTreeSet<String> { routing.hostgroups.get(&hg).map(|h| h.servers.iter().map(|s| s.addr.to_string()).collect()).unwrap_or_default() };
        let writer = addrs(whg);
        let readers = addrs(rhg);
        let fenced_routed = readers.iter().chain(writer.iter()).any(|a| self.fenced.contains(a));
        let leader_readers: BTreeSet<String> = self.leader_readers.iter().cloned().collect();
        let readers_differ = !leader_readers.is_empty() && leader_readers != readers;
        if writer.len() != 1 || !writer.contains(&self.primary) || fenced_routed || readers_differ {
            let p = self.primary.clone();
            if leader_readers.is_empty() {
                self.route_to(&p, "the leader's decision (etcd)");
            } else {
                let rs: Vec<String> = self.leader_readers.iter().filter(|a| !self.fenced.contains(*a)).cloned().collect();
                self.place(&p, &rs, "the leader's decision (etcd)");
            }
        }
        let gate = match &self.writer_block {
            Some(m) => Gate::Block(m.clone().into()),
            None => Gate::Open,
        };
        self.rt.set_gate(whg, gate);
    }

    /// What must survive a restart and what the other proxies apply.
    fn persisted(&self) -> Persisted {
        let routing = self.rt.routing();
        let writer_block = match routing.hostgroups.get(&self.cfg.writer_hostgroup).map(|h| h.gate.clone()) {
            Some(Gate::Block(m)) => Some(m.to_string()),
            _ => None,
        };
        let mut readers: Vec<String> = routing.hostgroups.get(&self.cfg.reader_hostgroup).map(|h| h.servers.iter().map(|s| s.addr.to_string()).collect()).unwrap_or_default();
        readers.sort();
        Persisted {
            primary: self.primary.clone(),
            fenced: self.fenced.clone(),
            cooldown_until_ms: self.cooldown_until.map(now_ms).unwrap_or(0),
            hold: self.hold.clone(),
            refused: self.refused,
            journal: self.journal.clone(),
            writer_block,
            readers,
        }
    }

    /// Write the state: to the admin db file (a local copy, also on followers), and as the
    /// leader to etcd. Err when this proxy is in a cluster and could not make the state
    /// shared (not the leader, etcd unreachable): a recovery step must then not be followed
    /// by the next.
    pub(super) async fn persist(&mut self) -> Result<(), String> {
        let state = self.persisted();
        if let Err(e) = self.durable.save(&self.cfg.cluster, &state, now_ms(SystemTime::now())) {
            error!(error = %e, "failover: cannot save the state");
        }
        let Some(cl) = self.cluster.clone() else { return Ok(()) };
        if !self.may_act() {
            return Err("not the leader".into());
        }
        if self.etcd_saved.as_ref() == Some(&state) {
            return Ok(());
        }
        match cl.save(&state).await {
            Ok(()) => {
                self.etcd_saved = Some(state);
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "cluster: the state could not be written to etcd");
                Err(e)
            }
        }
    }
}
