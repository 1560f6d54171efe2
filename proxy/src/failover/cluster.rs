//! Several proxies, one controller (`[cluster]`): leader election through an etcd lease and
//! the failover state shared through etcd (the `etcd-client` crate, etcd v3 API; Debian's
//! etcd-server 3.4 in the lab).
//!
//! Keys, under `<prefix>/<failover cluster>/`:
//! - `leader`: the leader's identity (JSON: name, admin address), put with the leader's
//!   lease by a transaction that succeeds only when the key does not exist. A dead or
//!   cut-off leader's lease expires after `lease_ttl_s` and the key with it; the others
//!   campaign every round (`ROUND`) and one of them wins.
//! - `state`: the controller's [`Persisted`] state (primary, fenced, cooldown, hold, the
//!   recovery journal) as JSON, written only by a transaction that checks that the leader
//!   key still carries this proxy's lease: a deposed leader cannot overwrite its
//!   successor's decisions.
//!
//! A leader acts on servers only while its lease is surely alive: until the send time of its
//! last acknowledged keep-alive plus two thirds of the TTL. Cut off from etcd, it stops
//! acting before anyone else can be elected. A follower cut off from etcd keeps routing on
//! the last state it read, and never promotes.

use super::state::Persisted;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// How often a proxy campaigns, renews, reads who leads and reads the state.
const ROUND: Duration = Duration::from_millis(200);

/// Who a proxy is, as written in the leader key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    /// Its admin HTTP address (where `failover` commands go).
    pub admin: String,
}

/// What `/api/failover` and `failover status` show of the election.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// "etcd" with endpoints, "single" without (this proxy leads alone).
    pub mode: String,
    pub me: String,
    pub leader: bool,
    /// The leader's identity as last read (None: nobody leads, or etcd unreachable).
    pub leader_name: Option<String>,
    pub leader_admin: Option<String>,
    pub etcd_endpoints: Vec<String>,
    pub etcd_reachable: bool,
    pub last_error: Option<String>,
    /// Times this proxy became the leader since it started.
    pub terms: u64,
}

/// The shared state as last read from etcd: (mod revision, state).
pub type Shared = Option<(i64, Persisted)>;

pub struct Cluster {
    me: Identity,
    endpoints: Vec<String>,
    /// User, password; TLS (CA, client certificate and key, PEM).
    user: Option<(String, String)>,
    tls: Option<etcd_client::TlsOptions>,
    leader_key: String,
    state_key: String,
    ttl: Duration,
    timeout: Duration,
    client: Mutex<Option<Client>>,
    lease_id: AtomicI64,
    /// Until when this proxy surely holds the leadership.
    valid_until: Mutex<Option<Instant>>,
    status: Mutex<Status>,
    state_tx: watch::Sender<Shared>,
}

struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// When the last acknowledged keep-alive (or the grant) was sent.
    renewed: Instant,
}

impl Cluster {
    /// Err when a TLS file cannot be read.
    pub fn new(cfg: &crate::config::ClusterConfig, cluster: &str, me: Identity) -> Result<Arc<Self>, String> {
        let read = |what: &str, f: &str| std::fs::read(f).map_err(|e| format!("[cluster] {what} {f}: {e}"));
        let tls = if cfg.etcd_ca_file.is_empty() {
            None
        } else {
            let mut t = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read("etcd_ca_file", &cfg.etcd_ca_file)?));
            if !cfg.etcd_cert_file.is_empty() {
                t = t.identity(etcd_client::Identity::from_pem(read("etcd_cert_file", &cfg.etcd_cert_file)?, read("etcd_key_file", &cfg.etcd_key_file)?));
            }
            Some(t)
        };
        let user = (!cfg.etcd_user.is_empty()).then(|| (cfg.etcd_user.clone(), cfg.etcd_password.clone()));
        let base = format!("{}/{}", cfg.prefix.trim_end_matches('/'), cluster);
        let status = Status { mode: "etcd".into(), me: me.name.clone(), etcd_endpoints: cfg.etcd_endpoints.clone(), ..Default::default() };
        Ok(Arc::new(Self {
            me,
            endpoints: cfg.etcd_endpoints.clone(),
            user,
            tls,
            leader_key: format!("{base}/leader"),
            state_key: format!("{base}/state"),
            ttl: Duration::from_secs(cfg.lease_ttl_s.max(2)),
            timeout: Duration::from_millis(cfg.timeout_ms.max(100)),
            client: Mutex::new(None),
            lease_id: AtomicI64::new(0),
            valid_until: Mutex::new(None),
            status: Mutex::new(status),
            state_tx: watch::channel(None).0,
        }))
    }

    /// Whether this proxy leads now (its lease surely alive).
    pub fn is_leader(&self) -> bool {
        let valid = self.valid_until.lock().map(|v| v.is_some_and(|u| Instant::now() < u)).unwrap_or(false);
        valid && self.lease_id.load(Ordering::Relaxed) != 0
    }

    /// Times this proxy became the leader (without copying the whole status).
    pub fn terms(&self) -> u64 {
        self.status.lock().map(|s| s.terms).unwrap_or(0)
    }

    pub fn status(&self) -> Status {
        let mut s = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        s.leader = self.is_leader();
        s
    }

    /// The state as last read from etcd; changes notify.
    pub fn state(&self) -> watch::Receiver<Shared> {
        self.state_tx.subscribe()
    }

    async fn bounded<T>(&self, what: &str, fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("etcd {what}: {e}")),
            Err(_) => Err(format!("etcd {what}: no answer within {} ms", self.timeout.as_millis())),
        }
    }

    fn client(&self) -> Option<Client> {
        self.client.lock().ok().and_then(|c| c.clone())
    }

    /// Write the state, only while this proxy's lease is on the leader key.
    pub async fn save(&self, state: &Persisted) -> Result<(), String> {
        let id = self.lease_id.load(Ordering::Relaxed);
        if id == 0 || !self.is_leader() {
            return Err("not the leader".into());
        }
        let mut c = self.client().ok_or("etcd: not connected")?;
        let json = serde_json::to_string(state).map_err(|e| e.to_string())?;
        let txn = Txn::new()
            .when([Compare::lease(self.leader_key.as_str(), CompareOp::Equal, id)])
            .and_then([TxnOp::put(self.state_key.as_str(), json, None)]);
        let r = self.bounded("txn (save state)", c.txn(txn)).await?;
        if !r.succeeded() {
            self.depose("the leader key carries another lease");
            return Err("leadership lost: the leader key carries another lease".into());
        }
        Ok(())
    }

    /// Read the state now (a new leader adopts it before acting).
    pub async fn load(&self) -> Result<Shared, String> {
        let mut c = self.client().ok_or("etcd: not connected")?;
        let r = self.bounded("get (state)", c.get(self.state_key.as_str(), None)).await?;
        match r.kvs().first() {
            None => Ok(None),
            Some(kv) => {
                let st: Persisted = serde_json::from_slice(kv.value()).map_err(|e| format!("etcd state {} is unreadable: {e}", self.state_key))?;
                Ok(Some((kv.mod_revision(), st)))
            }
        }
    }

    fn depose(&self, why: &str) {
        if let Ok(mut v) = self.valid_until.lock() {
            if v.take().is_some() {
                warn!(why, "cluster: this proxy is no longer the leader");
            }
        }
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.etcd_reachable = e.is_none();
            s.last_error = e;
        }
    }

    /// The election loop: renew, campaign, read who leads and the state, every round; on
    /// shutdown a leader revokes its lease so that another takes over at once.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        info!(me = %self.me.name, key = %self.leader_key, endpoints = ?self.endpoints, "cluster: campaigning through etcd");
        let mut lease: Option<Lease> = None;
        loop {
            if let Err(e) = self.round(&mut lease).await {
                let was = self.is_leader();
                self.depose(&e);
                if was || self.status.lock().map(|s| s.etcd_reachable).unwrap_or(true) {
                    warn!(error = %e, "cluster: etcd round failed");
                }
                self.set_error(Some(e));
            }
            tokio::select! {
                _ = tokio::time::sleep(ROUND) => {}
                _ = shutdown.changed() => break,
            }
        }
        if let (Some(l), Some(mut c)) = (lease, self.client()) {
            self.depose("shutting down");
            match self.bounded("lease revoke", c.lease_revoke(l.id)).await {
                Ok(_) => info!("cluster: lease revoked; another proxy takes over"),
                Err(e) => warn!(error = %e, "cluster: could not revoke the lease; it expires by itself"),
            }
        }
    }

    async fn round(&self, lease: &mut Option<Lease>) -> Result<(), String> {
        let mut c = match self.client() {
            Some(c) => c,
            None => {
                let mut opts = ConnectOptions::new().with_connect_timeout(self.timeout).with_timeout(self.timeout);
                if let Some((u, p)) = &self.user {
                    // etcd's auth tokens expire (5 min by default): renewed on expiry.
                    opts = opts.with_user(u.clone(), p.clone()).with_auto_token_refresh(true);
                }
                if let Some(t) = &self.tls {
                    opts = opts.with_tls(t.clone());
                }
                let c = self.bounded("connect", Client::connect(self.endpoints.clone(), Some(opts))).await?;
                if let Ok(mut slot) = self.client.lock() {
                    *slot = Some(c.clone());
                }
                c
            }
        };
        // A lease of our own, kept alive every third of its TTL.
        if lease.is_none() {
            let sent = Instant::now();
            let g = self.bounded("lease grant", c.lease_grant(self.ttl.as_secs() as i64, None)).await?;
            let (keeper, stream) = self.bounded("lease keep-alive", c.lease_keep_alive(g.id())).await?;
            *lease = Some(Lease { id: g.id(), keeper, stream, renewed: sent });
        }
        let Some(l) = lease.as_mut() else { return Ok(()) };
        if l.renewed.elapsed() >= self.ttl / 3 {
            let sent = Instant::now();
            let alive = match self.bounded("keep-alive", l.keeper.keep_alive()).await {
                Ok(()) => self.bounded("keep-alive reply", l.stream.message()).await,
                Err(e) => Err(e),
            };
            match alive {
                Ok(Some(r)) if r.ttl() > 0 => l.renewed = sent,
                Ok(_) => {
                    *lease = None;
                    self.lease_id.store(0, Ordering::Relaxed);
                    return Err("lease expired".into());
                }
                Err(e) => {
                    // The stream may be broken: a new one (with the same lease) next round,
                    // or a new lease once it expired.
                    if l.renewed.elapsed() >= self.ttl {
                        *lease = None;
                        self.lease_id.store(0, Ordering::Relaxed);
                    } else if let Ok((k, s)) = self.bounded("lease keep-alive", c.lease_keep_alive(l.id)).await {
                        l.keeper = k;
                        l.stream = s;
                    }
                    return Err(e);
                }
            }
        }
        let (id, renewed) = (l.id, l.renewed);
        self.lease_id.store(id, Ordering::Relaxed);
        // Campaign: take the leader key when nobody holds it.
        let me = serde_json::to_string(&self.me).map_err(|e| e.to_string())?;
        let txn = Txn::new()
            .when([Compare::create_revision(self.leader_key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(self.leader_key.as_str(), me, Some(PutOptions::new().with_lease(id)))]);
        self.bounded("txn (campaign)", c.txn(txn)).await?;
        let r = self.bounded("get (leader)", c.get(self.leader_key.as_str(), None)).await?;
        let kv = r.kvs().first();
        let leading = kv.is_some_and(|kv| kv.lease() == id);
        let who: Option<Identity> = kv.and_then(|kv| serde_json::from_slice(kv.value()).ok());
        let was = self.is_leader();
        if let Ok(mut v) = self.valid_until.lock() {
            *v = leading.then(|| renewed + self.ttl * 2 / 3);
        }
        if let Ok(mut s) = self.status.lock() {
            if leading && !was {
                s.terms += 1;
                info!(me = %self.me.name, term = s.terms, "cluster: this proxy is the leader");
            } else if !leading && was {
                warn!(me = %self.me.name, leader = ?who.as_ref().map(|w| &w.name), "cluster: leadership moved");
            }
            s.leader_name = who.as_ref().map(|w| w.name.clone());
            s.leader_admin = who.map(|w| w.admin);
            s.etcd_reachable = true;
            s.last_error = None;
        }
        // The state, for followers (and a leader's own view).
        let st = self.load().await?;
        self.state_tx.send_if_modified(|cur| {
            let changed = cur.as_ref().map(|c| c.0) != st.as_ref().map(|s| s.0);
            if changed {
                *cur = st;
            }
            changed
        });
        Ok(())
    }
}

/// This host's name (for the default identity).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into())
}
