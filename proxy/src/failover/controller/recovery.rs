//! Recovering a dead primary, as a journal of steps ([`crate::failover::journal`]): choose a
//! candidate (the load gate under the breakwater policy), catch it up, promote it, switch
//! the proxy's routing, repoint the other replicas, finish (cooldown, post hook, event).
//! Each step is saved before the next starts (with etcd: written to etcd by the leader, or
//! the recovery stops there), and a restarted proxy or a new leader takes the recovery up
//! where it stopped ([`Controller::resume`]).

use super::{now_ms, split_addr, Controller, Judgment, NotPromoted, Recovery};
use crate::failover::gtid::Position;
use crate::backend::hostgroup::Gate;
use crate::config::FailoverPolicy;
use crate::failover::actions;
use crate::failover::candidate;
use crate::failover::cascade::Watch;
use crate::failover::journal::{Journal, Step, PAUSE_LIMIT};
use std::time::{Duration, Instant, SystemTime};
use tracing::{error, warn};

impl Controller {
    /// Planned primary change with the primary alive: no acknowledged write is lost. The
    /// journal of a recovery, with the `demoted` step and the old primary kept as a replica.
    pub(super) async fn switchover(&mut self, want: Option<&str>) -> Result<String, String> {
        self.idle()?;
        let old = self.primary.clone();
        if !self.instances.get(&old).is_some_and(|i| i.reachable) {
            return Err(format!("primary {old} is not reachable: use failover"));
        }
        let healthy: Vec<candidate::Replica> = self
            .replicas_for_choice(&old)
            .into_iter()
            .filter(|r| self.instances.get(&r.addr).and_then(|i| i.replication.as_ref()).is_some_and(|x| x.io_ok() && x.sql_ok()))
            .map(|mut r| {
                // Everyone catches up before the switch, so positions do not decide.
                r.received = Position::default();
                r
            })
            .collect();
        let (cand, _) = candidate::choose(&healthy, want)?;
        self.hook("pre_promotion_hook", &self.cfg.pre_promotion_hook.clone(), "switchover", &old, &cand).await.map_err(|e| format!("switchover vetoed by {e}"))?;
        let others: Vec<String> = self.readers_of(&old).into_iter().filter(|a| *a != cand).collect();
        let mut readers = others.clone();
        readers.push(old.clone());
        let now = now_ms(SystemTime::now());
        self.rt.set_gate(self.cfg.writer_hostgroup, Gate::Hold(format!("switchover from {old} to {cand} in progress").into()));
        self.journal = Some(Journal {
            id: format!("{}-switchover-{now}", self.cfg.cluster),
            kind: "switchover".into(),
            failed: old,
            detected_ms: now,
            started_ms: now,
            candidate: cand,
            donor: None,
            others,
            readers,
            load_aware: false,
            old_load: Default::default(),
            own_connections: None,
            step: Step::Chosen,
            switched_ms: 0,
            log: Vec::new(),
            resumed: 0,
        });
        if let Err(e) = self.step_saved(Step::Chosen).await {
            return self.interrupted(e);
        }
        self.run_journal().await
    }

    /// Never a second recovery or switchover while one is unfinished (a failed resume
    /// leaves none).
    fn idle(&self) -> Result<(), String> {
        match &self.journal {
            Some(j) => Err(format!("{} {} of {} is in progress (after step {})", j.kind, j.id, j.failed, j.step.as_str())),
            None => Ok(()),
        }
    }

    /// The bound of each SQL action of a recovery (also of a rejoin).
    pub(super) fn action_limit(&self) -> Duration {
        Duration::from_millis(self.cfg.probe_timeout_ms.max(1000) * 5)
    }

    /// Promote a replica of the dead primary. `kind` is automated or manual.
    pub(super) async fn recover(&mut self, kind: &str, want: Option<&str>, detected: SystemTime) -> Result<String, String> {
        if !self.may_act() {
            return Err(self.not_leader());
        }
        self.idle()?;
        let failed = self.primary.clone();
        let mut log = Vec::new();
        // Re-check with a fresh connection before acting.
        if let Some(m) = self.member(&failed) {
            m.prober.forget();
            let again = m.prober.probe().await;
            if again.reachable {
                let msg = format!("primary {failed} answered the re-check; no promotion");
                self.event("RecoveryAborted", &failed, vec![], msg.clone());
                return Err(msg);
            }
            log.push(format!("re-check of {failed}: {}", again.error.unwrap_or_default()));
        }
        let whg = self.cfg.writer_hostgroup;
        self.rt.set_gate(whg, Gate::Hold(format!("failover of {failed} in progress").into()));
        match self.choose(&failed, kind, want, detected, &mut log).await {
            Ok(mut j) => {
                j.log = log;
                // Any attempt starts the block (no retry loop), saved with the first step so
                // that a crash-looping proxy does not reset it.
                self.cooldown_until = Some(SystemTime::now() + Duration::from_secs(self.cfg.recovery_block_seconds));
                self.journal = Some(j);
                if let Err(e) = self.step_saved(Step::Chosen).await {
                    return self.interrupted(e);
                }
                self.run_journal().await
            }
            Err(NotPromoted::Unfit(e)) => {
                // Nothing was done to any server: no cooldown, no automated retry; a person decides.
                self.count(|c| *c.recoveries.entry(format!("{kind}/refused")).or_default() += 1);
                let msg = format!(
                    "Breakwater: primary {failed} of cluster {} is down and no replica can carry its load ({e}). Writes are refused, \
                     reads are served by the replicas. Promote one anyway with `breakwater-proxy failover failover --to HOST:PORT`, \
                     or judge again with `breakwater-proxy failover ack`",
                    self.cfg.cluster
                );
                self.rt.set_gate(whg, Gate::Block(msg.clone().into()));
                self.refused = true;
                self.blocked_reported = true;
                warn!(%failed, reason = %e, "no fit candidate: nothing promoted");
                log.push(msg);
                self.event("NoFitCandidate", &failed, log, "nothing promoted; writes refused, reads served; waiting for a person");
                Err(e)
            }
            Err(NotPromoted::Failed(e)) => {
                self.cooldown_until = Some(SystemTime::now() + Duration::from_secs(self.cfg.recovery_block_seconds));
                self.fail(kind, &failed, log, e).await
            }
        }
    }

    /// Decide the candidate (and donor, readers) and pass the pre-promotion hook; nothing is
    /// changed on any server yet.
    async fn choose(&mut self, failed: &str, kind: &str, want: Option<&str>, detected: SystemTime, log: &mut Vec<String>) -> Result<Journal, NotPromoted> {
        let replicas = self.replicas_for_choice(failed);
        let breakwater = self.cfg.policy == FailoverPolicy::Breakwater;
        let mut judgment: Option<Judgment> = None;
        let (cand, donor) = if breakwater {
            let j = self.judge(failed, &replicas, now_ms(detected));
            log.push(format!("load of {failed} before its failure: {}", j.load));
            log.extend(j.verdicts.iter().map(|v| v.to_string()));
            let unfit: Vec<(String, String)> = j.verdicts.iter().filter(|v| !v.fit).map(|v| (v.addr.clone(), v.reasons.join("; "))).collect();
            self.count(|c| c.unfit_candidates += unfit.len() as u64);
            if let Ok(mut v) = self.shared.view.lock() {
                v.last_judgment = Some(j.clone());
            }
            judgment = Some(j);
            let plan = candidate::plan(&replicas, &unfit, want).map_err(|e| {
                if want.is_none() && !unfit.is_empty() {
                    NotPromoted::Unfit(e)
                } else {
                    NotPromoted::Failed(e)
                }
            })?;
            let overridden = want.filter(|w| unfit.iter().any(|(a, _)| a == w)).map(|w| format!(" (judged unfit, promoted on a person's order: {w})")).unwrap_or_default();
            log.push(format!(
                "candidate {}{overridden}{}{}",
                plan.candidate,
                plan.donor.as_ref().map(|d| format!(", caught up from {d} first")).unwrap_or_default(),
                if plan.notes.is_empty() { String::new() } else { format!(" (passed over: {})", plan.notes.join("; ")) }
            ));
            (plan.candidate, plan.donor)
        } else {
            let (cand, notes) = candidate::choose(&replicas, want)?;
            log.push(format!("candidate {cand}{}", if notes.is_empty() { String::new() } else { format!(" (passed over: {})", notes.join("; ")) }));
            (cand, None)
        };
        self.hook("pre_promotion_hook", &self.cfg.pre_promotion_hook.clone(), kind, failed, &cand).await.map_err(|e| format!("promotion vetoed by {e}"))?;
        let others: Vec<String> = replicas.iter().map(|r| r.addr.clone()).filter(|a| *a != cand).collect();
        let mut readers = others.clone();
        if breakwater {
            // The remaining replicas may not carry the reads alone (all unfit, or none): the
            // new primary serves reads too, balanced by latency with them.
            let unfit_left = |a: &String| judgment.as_ref().is_some_and(|j| j.verdicts.iter().any(|v| v.addr == *a && !v.fit));
            if readers.iter().all(unfit_left) {
                readers.push(cand.clone());
                log.push(format!("readers {others:?} cannot carry the reads alone: {cand} serves reads too"));
            }
        }
        let own_connections = self.history.get(&cand).and_then(|h| h.iter().rev().take(10).filter_map(|x| x.agent.as_ref().map(|a| a.connections)).max());
        let detected_ms = now_ms(detected);
        Ok(Journal {
            id: format!("{}-{detected_ms}", self.cfg.cluster),
            kind: kind.into(),
            failed: failed.into(),
            detected_ms,
            started_ms: now_ms(SystemTime::now()),
            candidate: cand,
            donor,
            others,
            readers,
            load_aware: breakwater,
            old_load: judgment.map(|j| j.load).unwrap_or_default(),
            own_connections,
            step: Step::Chosen,
            switched_ms: 0,
            log: Vec::new(),
            resumed: 0,
        })
    }

    /// Run the journal's remaining steps, then finish the recovery.
    async fn run_journal(&mut self) -> Result<String, String> {
        loop {
            let Some(mut j) = self.journal.take() else { return Err("no recovery in progress".into()) };
            let switchover = j.kind == "switchover";
            let next = match j.step {
                Step::Chosen if switchover => self.step_demote(&mut j).await.map(|()| Step::Demoted),
                Step::Chosen | Step::Demoted => self.step_catch_up(&mut j).await.map(|()| Step::CaughtUp),
                Step::CaughtUp => self.step_promote(&mut j).await.map(|()| Step::Promoted),
                Step::Promoted => {
                    self.step_switch(&mut j);
                    Ok(Step::Switched)
                }
                Step::Switched => {
                    self.step_repoint(&mut j).await;
                    Ok(Step::Repointed)
                }
                Step::Repointed => return self.finish(j).await,
            };
            match next {
                Ok(step) => {
                    j.step = step;
                    self.journal = Some(j);
                    if let Err(e) = self.step_saved(step).await {
                        return self.interrupted(e);
                    }
                }
                Err(e) => {
                    // Before `promoted` nothing accepts writes: the recovery fails, the
                    // cooldown stays, writes are refused until a person acts.
                    let (kind, failed, log) = (j.kind.clone(), j.failed.clone(), j.log);
                    return self.fail(&kind, &failed, log, e).await;
                }
            }
        }
    }

    /// Save the journal (with the state) and, under the test hook, pause there. Err when
    /// the step could not be made durable where the other proxies see it (with etcd: this
    /// proxy lost the leadership or etcd): the next step must not run.
    async fn step_saved(&mut self, step: Step) -> Result<(), String> {
        self.persist().await?;
        if self.pause_at != Some(step) {
            return Ok(());
        }
        let failed = self.journal.as_ref().map(|j| j.failed.clone()).unwrap_or_default();
        warn!(step = step.as_str(), "failover: recovery paused (BREAKWATER_FAILOVER_PAUSE_AT)");
        self.event(
            "RecoveryPaused",
            &failed,
            vec![format!("BREAKWATER_FAILOVER_PAUSE_AT={}", step.as_str())],
            format!("paused for up to {} s after step {} (a test hook)", PAUSE_LIMIT.as_secs(), step.as_str()),
        );
        self.publish();
        tokio::time::sleep(PAUSE_LIMIT).await;
        Ok(())
    }

    /// This proxy stops a recovery it can no longer make durable; the journal in etcd stays
    /// at its last saved step for the leader to take up.
    fn interrupted(&mut self, e: String) -> Result<String, String> {
        let Some(j) = self.journal.take() else { return Err(e) };
        let msg = format!("recovery {} stopped after step {}: {e}", j.id, j.step.as_str());
        self.event("RecoveryInterrupted", &j.failed, vec![e], "this proxy acts on no server; the leader takes the recovery up at its last saved step");
        Err(msg)
    }

    /// Switchover: the old primary stops taking writes.
    async fn step_demote(&mut self, j: &mut Journal) -> Result<(), String> {
        let limit = self.action_limit();
        let old = j.failed.clone();
        let m = self.member(&old).ok_or("primary is not a member")?;
        let c = m.prober.conn().await?;
        actions::exec(c, "SET GLOBAL read_only = 1", limit).await?;
        let pos = actions::gtid_binlog_pos(c, limit).await?;
        j.log.push(format!("{old}: read_only=1 at {pos}"));
        Ok(())
    }

    /// Switchover: the candidate applies everything the old primary has, including what was
    /// committing while read_only was set (its position is read again until it holds).
    async fn catch_up_with_old(&mut self, j: &mut Journal) -> Result<(), String> {
        let limit = self.action_limit();
        let (old, cand) = (j.failed.clone(), j.candidate.clone());
        let deadline = Instant::now() + Duration::from_millis(self.cfg.switchover_timeout_ms);
        let mut target = String::new();
        loop {
            let now = {
                let m = self.member(&old).ok_or("primary is not a member")?;
                actions::gtid_binlog_pos(m.prober.conn().await?, limit).await?
            };
            if now == target {
                break;
            }
            target = now;
            let m = self.member(&cand).ok_or("candidate is not a member")?;
            let c = m.prober.conn().await?;
            actions::wait_applied(c, &target, deadline.saturating_duration_since(Instant::now())).await.map_err(|e| format!("{cand}: {e}"))?;
        }
        j.log.push(format!("{cand} caught up to {target}"));
        Ok(())
    }

    /// The candidate gets every transaction there is: from a donor, or its own relay log
    /// (a switchover: from the old primary).
    async fn step_catch_up(&mut self, j: &mut Journal) -> Result<(), String> {
        if j.kind == "switchover" {
            return self.catch_up_with_old(j).await;
        }
        let limit = self.action_limit();
        let cand = j.candidate.clone();
        if let Some(d) = j.donor.clone() {
            return self.catch_up(&cand, &d, limit, &mut j.log).await;
        }
        let relay = Duration::from_millis(self.cfg.relay_apply_timeout_ms);
        let io_pos = self.instances.get(&cand).and_then(|i| i.replication.as_ref()).map(|r| r.gtid_io_pos.clone()).unwrap_or_default();
        let m = self.member(&cand).ok_or("candidate is not a member")?;
        let c = m.prober.conn().await?;
        actions::wait_applied(c, &io_pos, relay).await.map_err(|e| format!("{cand} relay log: {e}"))?;
        j.log.push(format!("{cand} applied its relay log up to {io_pos:?}"));
        Ok(())
    }

    async fn step_promote(&mut self, j: &mut Journal) -> Result<(), String> {
        let limit = self.action_limit();
        // The master side only with a replica to acknowledge: alone, every commit would wait
        // out the timeout first (rpl_semi_sync_master_wait_no_slave).
        // (After a switchover the old primary is a replica.)
        let has_replica = !j.others.is_empty() || j.kind == "switchover";
        let semi = (self.cfg.semi_sync && has_replica).then(|| Duration::from_millis(self.cfg.semi_sync_timeout_ms));
        let cand = j.candidate.clone();
        let m = self.member(&cand).ok_or("candidate is not a member")?;
        let c = m.prober.conn().await?;
        actions::promote(c, limit, semi).await.map_err(|e| format!("promoting {cand}: {e}"))?;
        j.log.push(format!("{cand}: STOP SLAVE, RESET SLAVE ALL, read_only=0{}", if semi.is_some() { ", semi-sync master side on (AFTER_SYNC)" } else { "" }));
        Ok(())
    }

    /// The proxy sends writes to the candidate and fences the failed primary (a switchover:
    /// reads go to the old one too). Run again on a resume after `switched` (a restarted
    /// proxy routes by its configuration first).
    fn step_switch(&mut self, j: &mut Journal) {
        let cand = j.candidate.clone();
        let switchover = j.kind == "switchover";
        let why = if switchover { format!("switchover: {} is now a replica", j.failed) } else { format!("failed primary {} fenced by failover", j.failed) };
        self.place(&cand, &j.readers, &why);
        if j.switched_ms == 0 {
            j.switched_ms = now_ms(SystemTime::now());
        }
        if j.load_aware {
            if let Some(srv) = self.rt.servers().iter().find(|s| *s.addr == *cand) {
                srv.pool.load.slow_start();
                if j.step < Step::Switched {
                    j.log.push(format!("write ramp: {cand}'s concurrency limit starts at {} and grows while its latency holds", srv.pool.load.limit()));
                }
            }
            self.watch = Some(Watch::new(&cand, j.switched_ms, j.old_load.clone(), j.own_connections));
            self.risk = None;
        }
        if !switchover {
            self.fenced.insert(j.failed.clone());
        }
        self.primary = cand.clone();
        if j.step < Step::Switched {
            j.log.push(format!("proxy: hostgroup {} -> {cand}; hostgroup {} -> {:?}", self.cfg.writer_hostgroup, self.cfg.reader_hostgroup, j.readers));
        }
    }

    /// The other replicas replicate from the candidate (with GTID: running it twice is safe);
    /// after a switchover the old primary too, its own binlog counting (current_pos).
    async fn step_repoint(&mut self, j: &mut Journal) {
        let limit = self.action_limit();
        let (host, port) = split_addr(&j.candidate);
        let (user, pw, semi_sync) = (self.cfg.replication_user.clone(), self.cfg.replication_password.clone(), self.cfg.semi_sync);
        let mut targets = j.others.clone();
        if j.kind == "switchover" {
            targets.push(j.failed.clone());
        }
        for o in targets {
            let use_gtid = if o == j.failed { "current_pos" } else { "slave_pos" };
            let Some(m) = self.member(&o) else { continue };
            let r = match m.prober.conn().await {
                Ok(c) => actions::repoint(c, &host, port, &user, &pw, use_gtid, semi_sync, limit).await,
                Err(e) => Err(e),
            };
            j.log.push(match r {
                Ok(()) => format!("{o} now replicates from {}", j.candidate),
                Err(e) => format!("{o} could not be repointed: {e}"),
            });
        }
    }

    /// The recovery or switchover is done: the record, the post hook, the event; after a
    /// failover also the cooldown. (A switchover's `detected_ms` is its start.)
    async fn finish(&mut self, j: Journal) -> Result<String, String> {
        let switchover = j.kind == "switchover";
        self.count(|c| *c.recoveries.entry(format!("{}/ok", j.kind)).or_default() += 1);
        if !switchover {
            self.cooldown_until = Some(SystemTime::now() + Duration::from_secs(self.cfg.recovery_block_seconds));
            self.blocked_reported = false;
            self.refused = false;
            self.dead_since = None;
        }
        let _ = self.persist().await;
        let duration_ms = j.switched_ms.saturating_sub(j.detected_ms);
        let write_pause_ms = j.switched_ms.saturating_sub(j.started_ms);
        let rec = Recovery {
            kind: j.kind.clone(),
            failed: j.failed.clone(),
            promoted: j.candidate.clone(),
            detected_at_ms: j.detected_ms,
            promoted_at_ms: j.switched_ms,
            duration_ms,
            write_pause_ms,
            acknowledged: switchover,
            steps: j.log.clone(),
        };
        if let Ok(mut v) = self.shared.view.lock() {
            v.last_recovery = Some(rec);
        }
        let Journal { kind, failed, candidate: promoted, mut log, resumed, .. } = j;
        if let Err(e) = self.hook("post_promotion_hook", &self.cfg.post_promotion_hook.clone(), &kind, &failed, &promoted).await {
            log.push(e);
        }
        let resumed = if resumed > 0 { format!(" (taken up again {resumed}× after a restart or a new leader)") } else { String::new() };
        let (event, msg) = if switchover {
            ("Switchover", format!("switched over from {failed} to {promoted}; writes paused {write_pause_ms} ms{resumed}"))
        } else {
            let block = self.cfg.recovery_block_seconds;
            ("RecoverDeadPrimary", format!("promoted {promoted} in {duration_ms} ms after detection{resumed}; {failed} fenced; automated recoveries blocked for {block} s"))
        };
        self.event(event, &failed, log, msg.clone());
        Ok(msg)
    }

    /// A switchover that promoted nothing: the old primary takes writes again.
    async fn roll_back(&mut self, old: &str, log: Vec<String>, e: String) -> Result<String, String> {
        self.count(|c| *c.recoveries.entry("switchover/failed".into()).or_default() += 1);
        self.journal = None;
        let limit = self.action_limit();
        let back = match self.member(old) {
            Some(m) => match m.prober.conn().await {
                Ok(c) => actions::exec(c, "SET GLOBAL read_only = 0", limit).await,
                Err(e) => Err(e),
            },
            None => Err(format!("{old} is not a member")),
        };
        self.rt.set_gate(self.cfg.writer_hostgroup, Gate::Open);
        let _ = self.persist().await;
        let action = match back {
            Ok(()) => format!("{e}; {old} stays primary (read_only = 0 again)"),
            Err(b) => format!("{e}; {old} stays primary, but read_only = 0 failed ({b}): writes fail until it is set"),
        };
        self.event("SwitchoverFailed", old, log, action);
        Err(e)
    }

    /// A recovery that promoted nothing: writes refused until a person acts.
    async fn fail(&mut self, kind: &str, failed: &str, log: Vec<String>, e: String) -> Result<String, String> {
        if kind == "switchover" {
            return self.roll_back(failed, log, e).await;
        }
        self.count(|c| *c.recoveries.entry(format!("{kind}/failed")).or_default() += 1);
        self.journal = None;
        self.refused = false;
        let msg = format!(
            "Breakwater: primary {failed} of cluster {} is down and failover failed: {e}. Writes are refused until a person acts (`breakwater-proxy failover failover --to HOST:PORT`)",
            self.cfg.cluster
        );
        self.rt.set_gate(self.cfg.writer_hostgroup, Gate::Block(msg.into()));
        self.blocked_reported = true;
        let _ = self.persist().await;
        error!(%failed, error = %e, "failover failed");
        self.event("RecoveryFailed", failed, log, e.clone());
        Err(e)
    }

    /// A recovery a previous run of this proxy (or a leader that died) left unfinished:
    /// take it up at its last saved step. Runs before the first poll, so discovery does
    /// not see a half-promoted candidate as a stray.
    pub(super) async fn resume(&mut self) {
        let Some(mut j) = self.journal.take() else { return };
        self.probe_all().await;
        j.resumed += 1;
        let at = j.step;
        self.event(
            "RecoveryResumed",
            &j.failed.clone(),
            vec![format!("recovery {} ({}) of {} to {} was left after step {}", j.id, j.kind, j.failed, j.candidate, at.as_str())],
            "taken up where it stopped; no second recovery",
        );
        if at < Step::Switched {
            self.rt.set_gate(self.cfg.writer_hostgroup, Gate::Hold(format!("{} of {} in progress (resumed)", j.kind, j.failed).into()));
            if !self.instances.get(&j.candidate).is_some_and(|i| i.reachable) {
                let e = format!("candidate {} is unreachable when the recovery is taken up after step {}", j.candidate, at.as_str());
                let (kind, failed, log) = (j.kind.clone(), j.failed.clone(), j.log);
                let _ = self.fail(&kind, &failed, log, e).await;
                return;
            }
        } else {
            // This process routes by its configuration: put the candidate back in charge.
            self.step_switch(&mut j);
        }
        self.journal = Some(j);
        if let Err(e) = self.persist().await {
            let _ = self.interrupted(e);
            return;
        }
        let _ = self.run_journal().await;
    }

    /// Give `cand` every transaction `donor` received: the donor applies its relay log (its
    /// binlog then has them: log_slave_updates), `cand` replicates from it with GTID until
    /// it has applied the donor's position, all within `catchup_timeout_ms`. On a timeout
    /// nothing is promoted.
    async fn catch_up(&mut self, cand: &str, donor: &str, limit: Duration, steps: &mut Vec<String>) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.catchup_timeout_ms);
        let left = || deadline.saturating_duration_since(Instant::now());
        let target = self.instances.get(donor).and_then(|i| i.replication.as_ref()).map(|r| r.gtid_io_pos.clone()).unwrap_or_default();
        let target = if target.is_empty() { self.instances.get(donor).map(|i| i.gtid_slave_pos.clone()).unwrap_or_default() } else { target };
        {
            let m = self.member(donor).ok_or("donor is not a member")?;
            let c = m.prober.conn().await?;
            actions::wait_applied(c, &target, left()).await.map_err(|e| format!("catch-up: donor {donor} applying its relay log: {e}"))?;
        }
        let (host, port) = split_addr(donor);
        let (user, pw, semi_sync) = (self.cfg.replication_user.clone(), self.cfg.replication_password.clone(), self.cfg.semi_sync);
        let t = Instant::now();
        {
            let m = self.member(cand).ok_or("candidate is not a member")?;
            let c = m.prober.conn().await?;
            actions::repoint(c, &host, port, &user, &pw, "slave_pos", semi_sync, limit).await.map_err(|e| format!("catch-up: pointing {cand} at {donor}: {e}"))?;
            actions::wait_applied(c, &target, left()).await.map_err(|e| format!("catch-up of {cand} from {donor}: {e}; nothing promoted"))?;
        }
        steps.push(format!("{cand} caught up from {donor} to {target} in {} ms", t.elapsed().as_millis()));
        Ok(())
    }
}
