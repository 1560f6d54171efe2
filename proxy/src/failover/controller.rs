//! The controller loop: every poll interval it probes every server of the cluster, runs
//! detection, and acts: promotes a replica when the primary is dead (unless recoveries are
//! blocked by the cooldown), takes dead replicas out of the reader hostgroup, keeps fenced
//! former primaries read-only. Commands from the CLI / HTTP API (switchover, manual
//! failover, ack, rejoin) are handled between polls, so only one change runs at a time.
//!
//! Everything a person needs to see (topology, problems, events, cooldown) is published to
//! [`Shared`] after every step; the HTTP API and /metrics read it without blocking the loop.
//!
//! Under the `breakwater` policy (the default) a promotion is load-aware: every poll samples
//! each member's load ([`gate::Sample`]); a dead primary's load before its failure is held
//! against each candidate's recent signals ([`gate::judge`]); an unfit one is skipped for a
//! fit one, which is first caught up from the most advanced replica when it is behind
//! ([`candidate::plan`]); with no fit candidate nothing is promoted (writes refused with the
//! reasons, reads served) until a person acts. The new primary's concurrency limit starts
//! low and ramps (slow start), and it is watched for a cascading risk ([`cascade`]): then
//! its limit is clamped, sheddable traffic refused, and automated promotions held until a
//! person acknowledges. The `orchestrator` policy does none of that, for comparison.

use super::actions::{self, HookEnv};

mod leader;
mod recovery;
use super::candidate::Replica;
use super::cascade::{Step, Watch};
use super::detect::{self, Kind, Problem};
use super::gate::{self, AgentSample, PrimaryLoad, Sample, Verdict};
use super::cluster::{self, Cluster};
use super::journal::{self, Journal};
use super::state::{Durable, Persisted};
use super::gtid::{Position, State};
use super::topology::{Instance, Prober};
use crate::backend::hostgroup::{Gate, Hostgroup};
use crate::config::{FailoverConfig, MonitorConfig, PromotionRule, ServerConfig};
use crate::runtime::{Proxy, Runtime};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

/// A command from a person.
#[derive(Debug, Clone)]
pub enum Request {
    /// Graceful switchover to `to` (or the best candidate) while the primary is alive.
    Switchover { to: Option<String> },
    /// Manual failover of a dead primary; ignores the cooldown.
    Failover { to: Option<String> },
    /// Acknowledge recoveries: ends the cooldown block.
    Ack { by: String },
    /// Put a fenced former primary back as a replica of the current primary.
    Rejoin { addr: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: u64,
    pub at_ms: u64,
    pub at: String,
    pub kind: String,
    pub addr: String,
    pub evidence: Vec<String>,
    pub action: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// automated, manual or switchover.
    pub kind: String,
    pub failed: String,
    pub promoted: String,
    pub detected_at_ms: u64,
    pub promoted_at_ms: u64,
    /// From detection (or the command) to the new primary taking writes in the proxy.
    pub duration_ms: u64,
    /// How long new writes were held in the proxy.
    pub write_pause_ms: u64,
    pub acknowledged: bool,
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ServerView {
    #[serde(flatten)]
    pub instance: Instance,
    /// primary, replica, fenced, detached.
    pub role: String,
    pub promotion_rule: String,
    /// Hostgroups the proxy routes to this server right now.
    pub hostgroups: Vec<u32>,
    /// The proxy's status of its entries (ONLINE, SHUNNED, OFFLINE_HARD).
    pub proxy_status: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Cooldown {
    pub active: bool,
    pub until_ms: Option<u64>,
    pub remaining_seconds: u64,
    pub block_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Counters {
    /// Problems detected, by kind (counted when they appear).
    pub detections: BTreeMap<String, u64>,
    /// Recoveries by "kind/result" (automated/ok, automated/failed, manual/ok, …).
    pub recoveries: BTreeMap<String, u64>,
    /// Automated recoveries not run because of the cooldown.
    pub blocked: u64,
    pub acks: u64,
    /// Candidates the load gate judged unfit, and cascading risks raised.
    pub unfit_candidates: u64,
    pub cascading_risks: u64,
}

/// The last load judgment of a dead primary's replicas (breakwater policy).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Judgment {
    pub failed: String,
    pub at_ms: u64,
    pub load: PrimaryLoad,
    pub verdicts: Vec<Verdict>,
}

/// A cascading risk raised on a freshly promoted primary.
#[derive(Debug, Clone, Serialize)]
pub struct Risk {
    pub addr: String,
    pub since_ms: u64,
    pub signs: Vec<String>,
    /// The concurrency limit after the last clamp.
    pub limit: u64,
    /// Query rules' shed_priority at or above which statements are refused.
    pub shedding_priority: u32,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct View {
    pub cluster: String,
    pub primary: String,
    pub writer_hostgroup: u32,
    pub reader_hostgroup: u32,
    /// Whether the proxy's writer hostgroup takes writes: open, hold: …, block: ….
    pub writer_gate: String,
    pub servers: Vec<ServerView>,
    pub problems: Vec<Problem>,
    pub cooldown: Cooldown,
    pub last_recovery: Option<Recovery>,
    pub events: VecDeque<Event>,
    pub counters: Counters,
    pub polls: u64,
    pub updated_ms: u64,
    /// breakwater or orchestrator.
    pub policy: String,
    pub last_judgment: Option<Judgment>,
    /// Raised now (None when there is none).
    pub cascading_risk: Option<Risk>,
    /// Why automated promotions are held until `failover ack` (after a cascading risk).
    pub promotion_hold: Option<String>,
    /// The newly promoted primary being watched for a cascading risk.
    pub watching: Option<String>,
    /// A recovery under way: its journal (the last step saved, the steps' log).
    pub recovery_in_progress: Option<Journal>,
    /// Whether this proxy runs detection and recovery (always, without etcd).
    pub leader: bool,
    /// The leader's name (this proxy's own without etcd).
    pub leader_name: Option<String>,
    /// The election (`[cluster]`).
    pub cluster_status: cluster::Status,
}

type Reply = oneshot::Sender<Result<String, String>>;

/// What the HTTP API and CLI talk to.
pub struct Shared {
    view: Mutex<View>,
    tx: mpsc::Sender<(Request, Reply)>,
}

impl Shared {
    pub fn view(&self) -> View {
        match self.view.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Send a command to the loop and wait for its outcome.
    pub async fn request(&self, r: Request) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((r, tx)).await.map_err(|_| "the failover controller is not running".to_string())?;
        rx.await.map_err(|_| "the failover controller stopped".to_string())?
    }
}

struct Member {
    addr: String,
    rule: PromotionRule,
    prober: Prober,
}

pub struct Controller {
    proxy: Arc<Proxy>,
    rt: Arc<Runtime>,
    cfg: FailoverConfig,
    members: Vec<Member>,
    shared: Arc<Shared>,
    primary: String,
    fenced: BTreeSet<String>,
    instances: BTreeMap<String, Instance>,
    active: BTreeSet<(Kind, String)>,
    cooldown_until: Option<SystemTime>,
    blocked_reported: bool,
    writer_tpl: ServerConfig,
    reader_tpl: ServerConfig,
    next_event: u64,
    discovered: bool,
    dead_since: Option<SystemTime>,
    monitor: MonitorConfig,
    /// Each member's recent samples (oldest first), and the counters they are deltas of.
    history: BTreeMap<String, VecDeque<Sample>>,
    counts: BTreeMap<String, (u64, u64, Instant)>,
    /// The new primary under watch for a cascading risk, the raised risk, the hold.
    watch: Option<Watch>,
    risk: Option<Risk>,
    last_clamp_ms: u64,
    hold: Option<String>,
    /// The load gate found no fit candidate: no automated retry until a person acts.
    refused: bool,
    /// The recovery under way, saved at every step (see `journal`).
    journal: Option<Journal>,
    /// The test hook `BREAKWATER_FAILOVER_PAUSE_AT`.
    pause_at: Option<journal::Step>,
    polls: u64,
    /// The state above that must survive a restart (see `state`).
    durable: Durable,
    /// `[cluster]`: the election and the shared state (None: this proxy leads alone).
    cluster: Option<Arc<Cluster>>,
    shared_rx: Option<watch::Receiver<cluster::Shared>>,
    /// The leadership term whose shared state this controller adopted (0: none yet).
    term: u64,
    /// The state last written to etcd, and the revision of the last one applied.
    etcd_saved: Option<Persisted>,
    applied_rev: i64,
    /// A follower's copy of the leader's refusal of writes and reader hostgroup.
    writer_block: Option<String>,
    leader_readers: Vec<String>,
    unsupported_reported: bool,
    /// The primary as last seen reachable: the errant-transaction check of candidates
    /// compares against it when the primary is dead.
    last_primary: Option<Instance>,
}

/// Why a promotion did not happen.
enum NotPromoted {
    /// No candidate can carry the load: writes refused, nothing promoted, no cooldown.
    Unfit(String),
    Failed(String),
}

impl From<String> for NotPromoted {
    fn from(e: String) -> Self {
        NotPromoted::Failed(e)
    }
}

impl From<&str> for NotPromoted {
    fn from(e: &str) -> Self {
        NotPromoted::Failed(e.to_string())
    }
}

fn now_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// RFC 3339 UTC time of a unix millisecond timestamp.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

fn split_addr(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(0)),
        None => (addr.to_string(), 0),
    }
}

/// Start the controller; returns the handle the admin interface uses.
pub fn spawn(proxy: Arc<Proxy>, monitor: &MonitorConfig, shutdown: watch::Receiver<bool>) -> Arc<Shared> {
    let rt = proxy.runtime();
    let cfg = rt.cfg.failover.clone();
    let (tx, rx) = mpsc::channel(16);
    let shared = Arc::new(Shared { view: Mutex::new(View::default()), tx });
    let servers = &rt.cfg.servers;
    let in_cluster = |s: &&ServerConfig| s.hostgroup == cfg.writer_hostgroup || s.hostgroup == cfg.reader_hostgroup;
    let mut members: Vec<Member> = Vec::new();
    for s in servers.iter().filter(in_cluster) {
        let addr = s.address();
        match members.iter_mut().find(|m| m.addr == addr) {
            Some(m) if s.promotion_rule != PromotionRule::Neutral => m.rule = s.promotion_rule,
            Some(_) => {}
            None => members.push(Member {
                addr: addr.clone(),
                rule: s.promotion_rule,
                prober: Prober::new(&s.host, s.port, &monitor.username, &monitor.password, Duration::from_millis(cfg.probe_timeout_ms))
                    .with_ssl(s.use_ssl.then(|| rt.backend_tls.mysql_async_opts())),
            }),
        }
    }
    let writer = servers.iter().find(|s| s.hostgroup == cfg.writer_hostgroup).cloned();
    let reader = servers.iter().find(|s| s.hostgroup == cfg.reader_hostgroup).cloned();
    let Some(writer_tpl) = writer else {
        error!("failover: no server in writer hostgroup {}; controller not started", cfg.writer_hostgroup);
        return shared;
    };
    let reader_tpl = reader.unwrap_or_else(|| ServerConfig { hostgroup: cfg.reader_hostgroup, ..writer_tpl.clone() });
    let durable = match Durable::open(&rt.cfg.admin.db_file, &cfg.cluster) {
        Ok(d) => d,
        Err(e) => {
            // Not knowing what this proxy decided before is worse than not starting: a
            // returning old primary could be trusted again.
            error!(error = %e, "failover: the durable state cannot be read; controller not started");
            return shared;
        }
    };
    let pause_at = match journal::pause_at_from_env() {
        Ok(p) => p,
        Err(e) => {
            error!(error = %e, "failover: controller not started");
            return shared;
        }
    };
    if !durable.is_durable() {
        warn!("failover state in memory only: without [admin] db_file a restarted proxy forgets fenced servers and the cooldown");
    }
    let mut c = Controller {
        primary: writer_tpl.address(),
        proxy,
        rt,
        members,
        shared: shared.clone(),
        fenced: BTreeSet::new(),
        instances: BTreeMap::new(),
        active: BTreeSet::new(),
        cooldown_until: None,
        blocked_reported: false,
        writer_tpl,
        reader_tpl,
        next_event: 1,
        discovered: false,
        dead_since: None,
        monitor: monitor.clone(),
        history: BTreeMap::new(),
        counts: BTreeMap::new(),
        watch: None,
        risk: None,
        last_clamp_ms: 0,
        hold: None,
        refused: false,
        journal: None,
        pause_at,
        polls: 0,
        durable,
        cluster: None,
        shared_rx: None,
        term: 0,
        etcd_saved: None,
        applied_rev: 0,
        writer_block: None,
        leader_readers: Vec::new(),
        last_primary: None,
        unsupported_reported: false,
        cfg,
    };
    let cl = &c.rt.cfg.cluster;
    if !cl.etcd_endpoints.is_empty() {
        let port = c.rt.cfg.proxy.listen.rsplit_once(':').map(|(_, p)| p.to_string()).unwrap_or_default();
        let name = if cl.name.is_empty() { format!("{}:{port}", cluster::hostname()) } else { cl.name.clone() };
        let me = cluster::Identity { name, admin: c.rt.cfg.admin.listen.clone() };
        let k = match Cluster::new(cl, &c.cfg.cluster, me) {
            Ok(k) => k,
            Err(e) => {
                // Acting alone would be a second controller beside the others: not at all.
                error!(error = %e, "failover: the etcd client cannot be set up; controller not started");
                return shared;
            }
        };
        tokio::spawn(k.clone().run(shutdown.clone()));
        c.shared_rx = Some(k.state());
        c.cluster = Some(k);
    }
    if let Some(p) = c.durable.loaded().cloned() {
        info!(cluster = %c.cfg.cluster, primary = %p.primary, fenced = ?p.fenced, cooldown_until_ms = p.cooldown_until_ms, "failover: state restored");
        if !p.primary.is_empty() {
            c.primary = p.primary.clone();
        }
        c.fenced = p.fenced.clone();
        c.cooldown_until = (p.cooldown_until_ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(p.cooldown_until_ms));
        c.hold = p.hold.clone();
        c.refused = p.refused;
        // With etcd a recovery in this local copy is etcd's to tell (the leader may have
        // finished it); alone, this proxy takes it up.
        if c.cluster.is_none() {
            c.journal = p.journal.clone();
        }
        c.event("StateRestored", &p.primary, vec![format!("fenced {:?}, cooldown until {}", p.fenced, rfc3339(p.cooldown_until_ms))], "from the admin db file");
    }
    tokio::spawn(c.run(rx, shutdown));
    shared
}

impl Controller {
    async fn run(mut self, mut rx: mpsc::Receiver<(Request, Reply)>, mut shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.cfg.poll_interval_ms.max(50));
        info!(cluster = %self.cfg.cluster, primary = %self.primary, members = self.members.len(), "failover controller started");
        // A recovery the previous run left unfinished comes first (with etcd: once this
        // proxy is elected, from the shared state).
        if self.cluster.is_none() {
            self.resume().await;
        }
        let mut shared_rx = self.shared_rx.clone();
        loop {
            let t = Instant::now();
            self.round().await;
            self.publish();
            let sleep = tokio::time::sleep(interval.saturating_sub(t.elapsed()));
            // A follower applies the leader's decisions as soon as they are read.
            let following = self.cluster.as_ref().is_some_and(|c| !c.is_leader());
            let decided = async {
                let ok = match shared_rx.as_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => false,
                };
                if !ok {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = decided, if following => {}
                req = rx.recv() => {
                    let Some((req, reply)) = req else { break };
                    self.probe_all().await;
                    let res = self.handle(req).await;
                    let _ = self.persist().await;
                    self.publish();
                    let _ = reply.send(res);
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    async fn probe_all(&mut self) {
        let probes = self.members.iter_mut().map(|m| m.prober.probe());
        let results = futures_util::future::join_all(probes).await;
        self.instances = results.into_iter().map(|i| (i.addr.clone(), i)).collect();
    }

    fn cooldown_active(&self) -> bool {
        self.cooldown_until.is_some_and(|u| SystemTime::now() < u)
    }

    fn event(&mut self, kind: &str, addr: &str, evidence: Vec<String>, action: impl Into<String>) {
        let at = now_ms(SystemTime::now());
        let action = action.into();
        warn!(cluster = %self.cfg.cluster, kind, addr, action = %action, evidence = ?evidence, "failover event");
        let e = Event { id: self.next_event, at_ms: at, at: rfc3339(at), kind: kind.into(), addr: addr.into(), evidence, action };
        self.next_event += 1;
        if let Ok(mut v) = self.shared.view.lock() {
            v.events.push_back(e);
            while v.events.len() > self.cfg.max_events.max(1) {
                v.events.pop_front();
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        if let Ok(mut v) = self.shared.view.lock() {
            f(&mut v.counters);
        }
    }

    /// Discovery, every poll: the primary is the writable server that is no replica and that
    /// the replicas follow (the most of them). When that is another server than the one the
    /// controller knows (another proxy failed over, or this one restarted after a failover),
    /// it follows. A writable server that is neither the primary nor fenced yet is fenced
    /// (read_only = 1, out of every hostgroup) and reported: two writable servers is a split
    /// brain in the making. The first discovery after a start also makes the routing match
    /// the primary (a persisted one may differ from the configured writer).
    fn discover_primary(&mut self) -> Vec<String> {
        let reachable: Vec<Instance> = self.instances.values().filter(|i| i.reachable).cloned().collect();
        if reachable.is_empty() {
            return Vec::new();
        }
        let first = !self.discovered;
        self.discovered = true;
        let writable = |i: &Instance| !i.read_only && i.replication.is_none();
        let mut votes: BTreeMap<String, usize> = BTreeMap::new();
        for i in &reachable {
            if let Some(r) = &i.replication {
                *votes.entry(r.master_addr()).or_default() += 1;
            }
        }
        let followed = reachable
            .iter()
            .filter(|i| writable(i) && !self.fenced.contains(&i.addr))
            .filter(|i| votes.get(&i.addr).copied().unwrap_or(0) > 0)
            .max_by_key(|i| (votes.get(&i.addr).copied().unwrap_or(0), i.addr == self.primary))
            .map(|i| i.addr.clone());
        let known_ok = reachable.iter().any(|i| i.addr == self.primary && writable(i));
        let known_votes = votes.get(&self.primary).copied().unwrap_or(0);
        let mut moved = false;
        if let Some(p) = followed.filter(|p| *p != self.primary) {
            if !known_ok || votes.get(&p).copied().unwrap_or(0) > known_votes {
                let old = std::mem::replace(&mut self.primary, p.clone());
                self.route_to(&p, "discovery: the replicas follow another primary");
                moved = true;
                self.event(
                    "DiscoveredPrimary",
                    &p,
                    vec![format!("{old} is not the primary: {p} is writable and {} replica(s) follow it", votes.get(&p).copied().unwrap_or(0))],
                    format!("writer hostgroup {} now routes to {p}", self.cfg.writer_hostgroup),
                );
            }
        }
        if first && !moved && known_ok {
            let routing = self.rt.routing();
            let routed = routing.hostgroups.get(&self.cfg.writer_hostgroup).and_then(|h| h.servers.first()).map(|s| s.addr.to_string());
            if routed.as_deref() != Some(self.primary.as_str()) {
                let p = self.primary.clone();
                self.route_to(&p, "restored failover state");
                self.event("DiscoveredPrimary", &p, vec![format!("the restored state names {p}; the configuration named {}", routed.unwrap_or_default())], "routing follows the restored state");
            }
        }
        // Writable servers that are not the primary: fence them.
        let strays: Vec<String> = reachable
            .iter()
            .filter(|i| writable(i) && i.addr != self.primary && !self.fenced.contains(&i.addr))
            .filter(|_| reachable.iter().any(|i| i.addr == self.primary))
            .map(|i| i.addr.clone())
            .collect();
        for a in &strays {
            self.fenced.insert(a.clone());
            self.event(
                "UnknownWritableServer",
                a,
                vec![format!("{a} accepts writes but the primary is {}; {} replica(s) follow it", self.primary, votes.get(a).copied().unwrap_or(0))],
                "fenced: read_only = 1, out of every hostgroup until `failover rejoin`",
            );
        }
        if !strays.is_empty() {
            let p = self.primary.clone();
            self.route_to(&p, "writable server fenced by discovery");
        }
        strays
    }

    /// Servers put in the writer or reader hostgroup at runtime (admin `LOAD MYSQL SERVERS
    /// TO RUNTIME`) become members: probed, and promotion candidates by their rule. Members
    /// are not dropped when they leave the hostgroups: the controller itself takes failed and
    /// fenced servers out and must keep watching them.
    fn sync_members(&mut self) {
        let routing = self.rt.routing();
        let mut added = Vec::new();
        for id in [self.cfg.writer_hostgroup, self.cfg.reader_hostgroup] {
            let Some(h) = routing.hostgroups.get(&id) else { continue };
            for s in &h.servers {
                let addr = s.cfg.address();
                match self.members.iter_mut().find(|m| m.addr == addr) {
                    Some(m) => {
                        if s.promotion_rule() != PromotionRule::Neutral {
                            m.rule = s.promotion_rule();
                        }
                    }
                    None => {
                        let timeout = Duration::from_millis(self.cfg.probe_timeout_ms);
                        let prober = Prober::new(&s.cfg.host, s.cfg.port, &self.monitor.username, &self.monitor.password, timeout)
                            .with_ssl(s.use_ssl().then(|| self.rt.backend_tls.mysql_async_opts()));
                        self.members.push(Member { addr: addr.clone(), rule: s.promotion_rule(), prober });
                        added.push((addr, id));
                    }
                }
            }
        }
        for (addr, hg) in added {
            info!(cluster = %self.cfg.cluster, %addr, hostgroup = hg, "failover: new member from the runtime configuration");
            self.event("MemberAdded", &addr, vec![format!("in hostgroup {hg} of the runtime configuration")], "probed from now on");
        }
    }

    /// What leader and followers both do every poll: members, probes, load samples.
    async fn observe(&mut self) {
        self.sync_members();
        self.probe_all().await;
        self.sample_all();
    }

    async fn tick(&mut self) {
        self.observe().await;
        // A server the controller cannot reason about (MySQL): refuse to act at all, loudly,
        // rather than take its missing GTID positions for a dead or errant server.
        let unsupported: Vec<(String, String)> = self.instances.values().filter_map(|i| i.unsupported.clone().map(|u| (i.addr.clone(), u))).collect();
        if !unsupported.is_empty() {
            if !self.unsupported_reported {
                self.unsupported_reported = true;
                for (addr, why) in unsupported {
                    error!(%addr, %why, "failover: unsupported server; the controller acts on nothing");
                    self.event("UnsupportedServer", &addr, vec![why], "no detection, no recovery, no fencing while it is a member");
                }
            }
            return;
        }
        self.unsupported_reported = false;
        for stray in self.discover_primary() {
            self.fence(&stray, false).await;
        }
        let problems = detect::detect(&self.primary, &self.instances, &self.fenced, self.reader_tpl.max_replication_lag.max(1) as i64);
        let now: BTreeSet<(Kind, String)> = problems.iter().map(|p| (p.kind, p.addr.clone())).collect();
        for p in &problems {
            if self.active.contains(&(p.kind, p.addr.clone())) {
                continue;
            }
            self.count(|c| *c.detections.entry(p.kind.as_str().into()).or_default() += 1);
            let action = match p.kind {
                Kind::DeadPrimary if self.cooldown_active() => "recovery blocked: cooldown active".to_string(),
                Kind::DeadPrimary => "recovering".into(),
                Kind::UnreachablePrimary => "none: replicas still replicate from it; re-checking every poll".into(),
                Kind::UnreachablePrimaryWithoutReplicas => "none: no replica in sight to confirm or promote".into(),
                Kind::DeadReplica => format!("removed from reader hostgroup {}", self.cfg.reader_hostgroup),
                Kind::WritableFencedServer => "set read_only = 1".into(),
                _ => "alert only".into(),
            };
            self.event(p.kind.as_str(), &p.addr, p.evidence.clone(), action);
        }
        for p in &problems {
            match p.kind {
                Kind::DeadPrimary => self.on_dead_primary().await,
                Kind::DeadReplica => {
                    for s in self.rt.servers().iter().filter(|s| *s.addr == *p.addr && s.cfg.hostgroup == self.cfg.reader_hostgroup) {
                        if s.is_online() {
                            s.set_status(crate::backend::server::Status::Shunned, "DeadReplica (failover controller)");
                        }
                    }
                }
                Kind::WritableFencedServer => self.fence(&p.addr, true).await,
                _ => {}
            }
        }
        let primary_ok = self.instances.get(&self.primary).is_some_and(|i| i.reachable);
        if primary_ok {
            self.last_primary = self.instances.get(&self.primary).cloned();
            self.dead_since = None;
            if self.blocked_reported {
                self.blocked_reported = false;
                self.rt.set_gate(self.cfg.writer_hostgroup, Gate::Open);
                let p = self.primary.clone();
                self.event("PrimaryReachableAgain", &p, vec![], "writes unblocked");
            }
        }
        self.active = now;
        self.watch_cascade().await;
    }

    async fn on_dead_primary(&mut self) {
        let detected = *self.dead_since.get_or_insert_with(SystemTime::now);
        if self.refused {
            return; // no fit candidate: a person decides (`failover failover --to`, or `ack` to judge again)
        }
        if let Some(why) = self.hold.clone() {
            if !self.blocked_reported {
                self.blocked_reported = true;
                self.count(|c| c.blocked += 1);
                let msg = format!(
                    "Breakwater: primary {} of cluster {} is down and automated promotion is held: {why}. Writes are refused, \
                     reads keep going to replicas. Run `breakwater-proxy failover ack` to allow automated recovery, or \
                     `breakwater-proxy failover failover --to HOST:PORT` to promote now",
                    self.primary, self.cfg.cluster
                );
                self.rt.set_gate(self.cfg.writer_hostgroup, Gate::Block(msg.clone().into()));
                let p = self.primary.clone();
                self.event("RecoveryBlocked", &p, vec![msg], "no automated promotion (held after a cascading risk); reads keep going to replicas");
            }
            return;
        }
        if self.cooldown_active() {
            if !self.blocked_reported {
                self.blocked_reported = true;
                self.count(|c| c.blocked += 1);
                let until = self.cooldown_until.map(now_ms).unwrap_or(0);
                let msg = format!(
                    "Breakwater: primary {} of cluster {} is down and automated failover is in cooldown until {} \
                     (recovery_block_seconds={}); writes are refused. Run `breakwater-proxy failover ack` to allow \
                     automated recovery, or `breakwater-proxy failover failover` to promote now",
                    self.primary,
                    self.cfg.cluster,
                    rfc3339(until),
                    self.cfg.recovery_block_seconds
                );
                self.rt.set_gate(self.cfg.writer_hostgroup, Gate::Block(msg.clone().into()));
                let p = self.primary.clone();
                self.event("RecoveryBlocked", &p, vec![msg], "no automated promotion; reads keep going to replicas");
            }
            return;
        }
        let _ = self.recover("automated", None, detected).await;
    }

    async fn handle(&mut self, req: Request) -> Result<String, String> {
        info!(?req, "failover command");
        if !self.may_act() {
            return Err(self.not_leader());
        }
        match req {
            Request::Ack { by } => {
                let was = self.cooldown_active() || self.hold.is_some() || self.refused;
                self.cooldown_until = None;
                self.hold = None;
                self.refused = false;
                if let Ok(mut v) = self.shared.view.lock() {
                    if let Some(r) = v.last_recovery.as_mut() {
                        r.acknowledged = true;
                    }
                }
                self.count(|c| c.acks += 1);
                let p = self.primary.clone();
                self.event("Acknowledged", &p, vec![format!("by {by}")], if was { "cooldown and holds ended" } else { "no cooldown or hold was active" });
                // A primary that is dead right now is recovered at once.
                if self.instances.get(&self.primary).is_none_or(|i| !i.reachable) {
                    self.blocked_reported = false;
                    self.tick().await;
                }
                Ok(format!("acknowledged; automated recovery of cluster {} is allowed again", self.cfg.cluster))
            }
            Request::Failover { to } => {
                if self.instances.get(&self.primary).is_some_and(|i| i.reachable) {
                    return Err(format!("primary {} is reachable: use switchover for a planned change", self.primary));
                }
                let detected = *self.dead_since.get_or_insert_with(SystemTime::now);
                self.recover("manual", to.as_deref(), detected).await
            }
            Request::Switchover { to } => self.switchover(to.as_deref()).await,
            Request::Rejoin { addr } => self.rejoin(&addr).await,
        }
    }

    fn member(&mut self, addr: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.addr == addr)
    }

    fn replicas_for_choice(&self, of: &str) -> Vec<Replica> {
        // A dead primary's history as last seen (its newest writes are then left out of the
        // check by its server id anyway).
        let primary = self.instances.get(of).filter(|p| p.reachable).or(self.last_primary.as_ref().filter(|p| p.addr == of));
        detect::replicas_of(of, &self.instances, &self.fenced)
            .into_iter()
            .map(|i| {
                let mut received = Position::parse(&i.gtid_slave_pos).unwrap_or_default();
                if let Some(io) = i.replication.as_ref().and_then(|r| Position::parse(&r.gtid_io_pos).ok()) {
                    for (d, g) in io.domains {
                        let e = received.domains.entry(d).or_insert(g);
                        if g.seq > e.seq {
                            *e = g;
                        }
                    }
                }
                let errant = primary.is_some_and(|p| !detect::errant(p, i).is_empty());
                let rule = self.members.iter().find(|m| m.addr == i.addr).map(|m| m.rule).unwrap_or_default();
                Replica { addr: i.addr.clone(), rule, received, errant }
            })
            .collect()
    }

    /// The reachable, unfenced replicas of `primary`.
    fn readers_of(&self, primary: &str) -> Vec<String> {
        detect::replicas_of(primary, &self.instances, &self.fenced).iter().map(|i| i.addr.clone()).collect()
    }

    /// Writes to `primary`, reads to its replicas.
    fn route_to(&self, primary: &str, reason: &str) {
        self.place(primary, &self.readers_of(primary), reason);
    }

    /// Route writes to `writer` and reads to `readers`, in one snapshot.
    fn place(&self, writer: &str, readers: &[String], reason: &str) {
        let tpl = |addr: &str, size: &ServerConfig| -> ServerConfig {
            let mut c = self
                .rt
                .servers()
                .iter()
                .find(|s| *s.addr == *addr)
                .map(|s| s.config())
                .unwrap_or_else(|| {
                    let (host, port) = split_addr(addr);
                    ServerConfig { host, port, socket: None, ..size.clone() }
                });
            c.weight = size.weight;
            c.max_connections = size.max_connections;
            c.max_replication_lag = size.max_replication_lag;
            c
        };
        let (whg, rhg) = (self.cfg.writer_hostgroup, self.cfg.reader_hostgroup);
        let w = self.rt.entry(whg, writer, || tpl(writer, &self.writer_tpl));
        let rs = readers.iter().map(|a| self.rt.entry(rhg, a, || tpl(a, &self.reader_tpl))).collect();
        self.rt.switch(
            vec![Hostgroup { id: whg, servers: vec![w], gate: Gate::Open }, Hostgroup { id: rhg, servers: rs, gate: Gate::Open }],
            reason,
        );
    }

    async fn hook(&self, which: &str, cmd: &Option<String>, kind: &str, failed: &str, promoted: &str) -> Result<String, String> {
        let Some(cmd) = cmd else { return Ok(String::new()) };
        let env = HookEnv { cluster: &self.cfg.cluster, kind, failed, promoted };
        actions::run_hook(cmd, &env, Duration::from_millis(self.cfg.hook_timeout_ms)).await.map_err(|e| format!("{which}: {e}"))
    }

    /// Each member's load this poll: the proxy's counters as rates since the last poll, its
    /// latency and limit, replication lag, and the agent's fresh signals.
    fn sample_all(&mut self) {
        let at_ms = now_ms(SystemTime::now());
        let routing = self.rt.routing();
        let max_age = Duration::from_millis(self.rt.cfg.signals.max_age_ms);
        let adaptive = self.rt.cfg.proxy.adaptive_limit;
        // Kept: the gate's window twice over, so the window before a failure is still there
        // when a person asks for a judgment a while later.
        let keep = ((self.cfg.gate.window_ms * 2) / self.cfg.poll_interval_ms.max(50)).clamp(4, 10_000) as usize;
        for m in &self.members {
            let inst = self.instances.get(&m.addr);
            let mut s = Sample { at_ms, lag_s: inst.and_then(|i| i.replication.as_ref()).and_then(|r| r.seconds_behind_master), ..Default::default() };
            // Committed (the primary's binlog) or applied (a replica's slave position).
            s.trx = inst.filter(|i| i.reachable).and_then(|i| {
                let pos = if i.replication.is_some() { &i.gtid_slave_pos } else { &i.gtid_binlog_pos };
                Position::parse(pos).ok().map(|p| p.weight())
            });
            if let Some(srv) = routing.hostgroups.values().flat_map(|h| h.servers.iter()).find(|x| *x.addr == *m.addr) {
                let load = &srv.pool.load;
                let (stmts, shed) = (load.statements.load(std::sync::atomic::Ordering::Relaxed), load.shed.load(std::sync::atomic::Ordering::Relaxed));
                if let Some((ps, pshed, pt)) = self.counts.insert(m.addr.clone(), (stmts, shed, Instant::now())) {
                    let dt = pt.elapsed().as_secs_f64();
                    if dt > 0.0 {
                        s.statements_per_s = stmts.saturating_sub(ps) as f64 / dt;
                    }
                    s.shed = shed.saturating_sub(pshed);
                }
                s.latency_ms = load.latency_ms();
                s.in_flight = load.in_flight.load(std::sync::atomic::Ordering::Relaxed);
                s.limit = adaptive.then(|| load.limit());
                if let Some((x, true)) = crate::adaptive::view::agent_series_of(&self.proxy, &srv.cfg.host, srv.cfg.port, max_age) {
                    s.agent = Some(AgentSample {
                        cpu_cores: x.recent.cpu_cores,
                        cpu_limit: x.cpu_limit,
                        throttled_ratio: x.recent.throttled_ratio,
                        pressure: x.pressure,
                        memory_bytes: x.memory_bytes,
                        memory_limit: x.memory_limit,
                        p99_ms: x.recent.p99_ms,
                        requests_per_s: x.recent.requests_per_s,
                        connections: x.active,
                    });
                }
            }
            let h = self.history.entry(m.addr.clone()).or_default();
            h.push_back(s);
            while h.len() > keep {
                h.pop_front();
            }
        }
    }

    /// The dead primary's load over the gate's window before `dead_ms` (the sample of the
    /// poll that saw it die is left out), and each candidate's verdict on its samples of
    /// the same window (its latest window when those aged out).
    fn judge(&self, failed: &str, replicas: &[Replica], dead_ms: u64) -> Judgment {
        let w = self.cfg.gate.window_ms;
        let poll = self.cfg.poll_interval_ms;
        let before = |addr: &str, until: u64| -> Vec<Sample> {
            self.history.get(addr).map(|h| h.iter().filter(|s| s.at_ms + w >= dead_ms && s.at_ms < until).cloned().collect()).unwrap_or_default()
        };
        let load = gate::primary_load(&before(failed, dead_ms.saturating_sub(poll / 2)));
        let verdicts = replicas
            .iter()
            .map(|r| {
                let mut samples = before(&r.addr, dead_ms + poll);
                if samples.is_empty() {
                    let h = self.history.get(&r.addr);
                    let n = (w / poll.max(50)).max(1) as usize;
                    samples = h.map(|h| h.iter().rev().take(n).rev().cloned().collect()).unwrap_or_default();
                }
                gate::judge(&r.addr, &samples, &load, &self.cfg.gate)
            })
            .collect();
        Judgment { failed: failed.into(), at_ms: now_ms(SystemTime::now()), load, verdicts }
    }

    /// One poll of the cascade watch on a freshly promoted primary (breakwater policy).
    async fn watch_cascade(&mut self) {
        let Some(mut w) = self.watch.take() else { return };
        if w.addr != self.primary {
            return; // replaced since (a switchover, a manual failover): the watch ends
        }
        let now = now_ms(SystemTime::now());
        let recent: Vec<Sample> = self.history.get(&w.addr).map(|h| h.iter().filter(|s| s.at_ms >= w.promoted_ms).cloned().collect()).unwrap_or_default();
        let step = w.step(now, &recent, &self.cfg.cascade);
        let addr = w.addr.clone();
        let load = self.rt.servers().iter().find(|s| *s.addr == *addr).map(|s| s.pool.load.clone());
        let clamp = |risk: &mut Risk| {
            if let Some(l) = &load {
                l.clamp(self.cfg.cascade.clamp);
                risk.limit = l.limit();
            }
        };
        match step {
            Step::Quiet => self.watch = Some(w),
            Step::Done => {
                let e = format!("no sign of a cascading risk in {} s after its promotion", self.cfg.cascade.watch_seconds);
                self.event("CascadeWatchEnded", &addr, vec![], e);
            }
            Step::Raise(signs) => {
                let mut risk = Risk { addr: addr.clone(), since_ms: now, signs: signs.clone(), limit: 0, shedding_priority: 1 };
                clamp(&mut risk);
                self.last_clamp_ms = now;
                let reason = format!("cascading risk on the new primary {addr}: {}", signs.join("; "));
                self.rt.shedding.start(self.cfg.writer_hostgroup, 1, &reason);
                self.hold = Some(reason.clone());
                self.count(|c| c.cascading_risks += 1);
                let action = format!(
                    "concurrency limit clamped to {}; sheddable traffic (query rules with shed_priority > 0) refused; automated promotion held until `failover ack`",
                    risk.limit
                );
                self.risk = Some(risk);
                let hook = self.hook("post_promotion_hook", &self.cfg.post_promotion_hook.clone(), "cascading_risk", &addr, &addr).await;
                let mut evidence = signs;
                if let Err(e) = hook {
                    evidence.push(e);
                }
                self.event("CascadingRisk", &addr, evidence, action);
                self.watch = Some(w);
            }
            Step::Persist(signs) => {
                if !signs.is_empty() && now.saturating_sub(self.last_clamp_ms) >= self.cfg.cascade.clamp_every_s * 1000 {
                    if let Some(mut risk) = self.risk.take() {
                        clamp(&mut risk);
                        risk.signs = signs;
                        self.last_clamp_ms = now;
                        self.risk = Some(risk);
                    }
                }
                self.watch = Some(w);
            }
            Step::Clear => {
                self.rt.shedding.stop();
                self.risk = None;
                self.event("CascadingRiskCleared", &addr, vec![], "no sign for a while: sheddable traffic served again; the promotion hold stays until `failover ack`");
                self.watch = Some(w);
            }
        }
    }

    /// read_only = 1 on a member (bounded by the probe timeout).
    async fn set_read_only(&mut self, addr: &str) -> Result<(), String> {
        let limit = Duration::from_millis(self.cfg.probe_timeout_ms);
        let m = self.member(addr).ok_or_else(|| format!("{addr} is not a member"))?;
        actions::exec(m.prober.conn().await?, "SET GLOBAL read_only = 1", limit).await
    }

    /// read_only = 1 on a member that should not take writes: a former primary that came
    /// back writable (`announce`: a `Fenced` event), or one discovery found writable (its
    /// event is already out). A failure is always an event.
    async fn fence(&mut self, addr: &str, announce: bool) {
        if self.member(addr).is_none() {
            return;
        }
        let a = addr.to_string();
        match self.set_read_only(addr).await {
            Ok(()) if announce => self.event("Fenced", &a, vec!["former primary came back writable".into()], "set read_only = 1; kept out of every hostgroup until `failover rejoin`"),
            Ok(()) => {}
            Err(e) => self.event("FenceFailed", &a, vec![e], "could not set read_only = 1"),
        }
    }

    async fn rejoin(&mut self, addr: &str) -> Result<String, String> {
        if !self.fenced.contains(addr) {
            return Err(format!("{addr} is not fenced"));
        }
        let p = self.primary.clone();
        // Its history must fit: nothing the primary does not have (writes that never reached
        // the primary before the failover, or written since). Replicating on top of those
        // would stop on a gtid_strict_mode error, or leave rows that differ silently.
        let old = self.instances.get(addr).cloned().unwrap_or_default();
        let prim = self.instances.get(&p).cloned().unwrap_or_default();
        if !old.reachable || !prim.reachable {
            let (who, why) = if !old.reachable { (addr, old.error) } else { (p.as_str(), prim.error) };
            return Err(format!("{who} is not reachable ({}): rejoin needs both {addr} and the primary {p}", why.unwrap_or_default()));
        }
        let extra = match (State::parse(&old.gtid_binlog_state), State::parse(&prim.gtid_binlog_state)) {
            (Ok(o), Ok(n)) => o.beyond(&n, &[]),
            (Err(e), _) | (_, Err(e)) => return Err(format!("rejoin refused: cannot read the GTID histories: {e}")),
        };
        if !extra.is_empty() {
            let msg = format!(
                "rejoin of {addr} refused: it has transactions the primary {p} does not have: {}. Replicating from {p} on top of them would diverge. They never reached the primary: keep what matters from {addr}'s binlog (mariadb-binlog), then rebuild {addr} from a copy of {p} and rejoin it",
                extra.join("; ")
            );
            self.event("RejoinRefused", addr, extra, "kept fenced (read_only = 1, out of every hostgroup)");
            return Err(msg);
        }
        let (host, port) = split_addr(&p);
        let limit = self.action_limit();
        let (user, pw, semi_sync) = (self.cfg.replication_user.clone(), self.cfg.replication_password.clone(), self.cfg.semi_sync);
        let m = self.member(addr).ok_or_else(|| format!("{addr} is not a member of the cluster"))?;
        let c = m.prober.conn().await?;
        actions::repoint(c, &host, port, &user, &pw, "current_pos", semi_sync, limit).await?;
        self.fenced.remove(addr);
        let mut readers = self.readers_of(&self.primary);
        if !readers.iter().any(|r| r == addr) {
            readers.push(addr.to_string());
        }
        self.place(&p, &readers, "rejoin");
        let msg = format!("{addr} replicates from {p} and is back in reader hostgroup {}", self.cfg.reader_hostgroup);
        self.event("Rejoined", addr, vec![], msg.clone());
        Ok(msg)
    }

    fn publish(&self) {
        let routing = self.rt.routing();
        let whg = self.cfg.writer_hostgroup;
        let gate = match routing.hostgroups.get(&whg).map(|h| h.gate.clone()) {
            Some(Gate::Hold(m)) => format!("hold: {m}"),
            Some(Gate::Block(m)) => format!("block: {m}"),
            _ => "open".into(),
        };
        let servers: Vec<ServerView> = self
            .members
            .iter()
            .map(|m| {
                let inst = self.instances.get(&m.addr).cloned().unwrap_or_else(|| Instance { addr: m.addr.clone(), ..Default::default() });
                let role = if m.addr == self.primary {
                    "primary"
                } else if self.fenced.contains(&m.addr) {
                    "fenced"
                } else if inst.replication.is_some() {
                    "replica"
                } else if inst.reachable {
                    "detached"
                } else {
                    "unknown"
                };
                let mut hgs: Vec<u32> = routing
                    .hostgroups
                    .values()
                    .filter(|h| h.servers.iter().any(|s| *s.addr == *m.addr))
                    .map(|h| h.id)
                    .collect();
                hgs.sort();
                let status: Vec<String> = routing
                    .hostgroups
                    .values()
                    .flat_map(|h| h.servers.iter())
                    .filter(|s| *s.addr == *m.addr)
                    .map(|s| format!("hg{}:{}", s.cfg.hostgroup, s.status().as_str()))
                    .collect();
                ServerView {
                    instance: inst,
                    role: role.into(),
                    promotion_rule: m.rule.as_str().into(),
                    hostgroups: hgs,
                    proxy_status: status.join(" "),
                }
            })
            .collect();
        let problems = detect::detect(&self.primary, &self.instances, &self.fenced, self.reader_tpl.max_replication_lag.max(1) as i64);
        let cooldown = match self.cooldown_until.filter(|_| self.cooldown_active()) {
            Some(u) => Cooldown {
                active: true,
                until_ms: Some(now_ms(u)),
                remaining_seconds: u.duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0),
                block_seconds: self.cfg.recovery_block_seconds,
            },
            None => Cooldown { block_seconds: self.cfg.recovery_block_seconds, ..Default::default() },
        };
        if let Ok(mut v) = self.shared.view.lock() {
            v.cluster = self.cfg.cluster.clone();
            v.primary = self.primary.clone();
            v.writer_hostgroup = whg;
            v.reader_hostgroup = self.cfg.reader_hostgroup;
            v.writer_gate = gate;
            v.servers = servers;
            v.problems = problems;
            v.cooldown = cooldown;
            v.polls = self.polls;
            v.updated_ms = now_ms(SystemTime::now());
            v.policy = self.cfg.policy.as_str().into();
            v.cascading_risk = self.risk.clone();
            v.promotion_hold = self.hold.clone();
            v.watching = self.watch.as_ref().map(|w| w.addr.clone());
            v.recovery_in_progress = self.journal.clone();
            v.cluster_status = self.cluster_status();
            v.leader = v.cluster_status.leader;
            v.leader_name = v.cluster_status.leader_name.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(1_795_651_200_123), "2026-11-26T00:00:00.123Z");
    }
}
