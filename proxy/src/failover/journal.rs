//! The recovery journal: a promotion of a replica, written down step by step so that a proxy
//! killed in the middle (kill -9, an upgrade, a crash loop) finishes it on restart instead
//! of starting a second one.
//!
//! A recovery of a dead primary goes through these steps, each saved (with the controller's
//! state, in the admin db file or etcd) before the next one starts:
//!
//! | step        | what is true once it is saved                          | on restart          |
//! |-------------|--------------------------------------------------------|---------------------|
//! | `chosen`    | the candidate, donor, readers are decided; pre hook ok | catch up, go on     |
//! | `caught_up` | the candidate has every transaction it can get          | promote, go on      |
//! | `promoted`  | the candidate is writable, replicates from nobody       | route to it, go on  |
//! | `switched`  | the proxy routes writes to it; the failed one is fenced | repoint, go on      |
//! | `repointed` | the other replicas replicate from it                    | cooldown, post hook |
//!
//! Every step is idempotent (STOP SLAVE / RESET SLAVE ALL / read_only = 0 again on a primary,
//! CHANGE MASTER to the same primary with GTID again, the same routing snapshot again), so
//! running a step twice, once before the kill and once after, does what running it once
//! does. Before `promoted` no server accepts writes, so a recovery whose candidate cannot be
//! reached on restart fails (writes refused, a person decides) rather than choosing another:
//! the candidate may have been promoted by a step whose reply was lost.
//!
//! A switchover (the primary alive) is the same journal with `kind = "switchover"`, one more
//! step, `demoted` (the old primary is read_only; its position is what the candidate must
//! reach), and the old primary kept as a replica of the new one. Taken up after `chosen` or
//! `demoted` with the candidate unreachable, it is rolled back (the old primary writable
//! again) instead of failed.
//!
//! For tests, `BREAKWATER_FAILOVER_PAUSE_AT=<step>` makes the controller stop for up to
//! `PAUSE_LIMIT` right after saving that step (a `RecoveryPaused` event says so), so a test
//! can kill the proxy there.

use super::gate::PrimaryLoad;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Chosen,
    /// Switchover only: the old primary is read_only.
    Demoted,
    CaughtUp,
    Promoted,
    Switched,
    Repointed,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::Chosen,
        Step::Demoted,
        Step::CaughtUp,
        Step::Promoted,
        Step::Switched,
        Step::Repointed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Chosen => "chosen",
            Step::Demoted => "demoted",
            Step::CaughtUp => "caught_up",
            Step::Promoted => "promoted",
            Step::Switched => "switched",
            Step::Repointed => "repointed",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Self::ALL.into_iter().find(|x| x.as_str() == s.trim())
    }
}

/// One recovery in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// `<cluster>-<detected unix ms>`: the same failure keeps its id across restarts.
    pub id: String,
    /// automated, manual or switchover.
    pub kind: String,
    pub failed: String,
    pub detected_ms: u64,
    pub started_ms: u64,
    pub candidate: String,
    /// Catch the candidate up from this replica first.
    pub donor: Option<String>,
    /// The other replicas, to be repointed at the candidate.
    pub others: Vec<String>,
    /// The reader hostgroup once the candidate takes writes.
    pub readers: Vec<String>,
    /// breakwater policy: slow start and the cascade watch on the new primary.
    pub load_aware: bool,
    /// The failed primary's load before it failed, for the cascade watch.
    #[serde(default)]
    pub old_load: PrimaryLoad,
    #[serde(default)]
    pub own_connections: Option<u64>,
    /// The last step done.
    pub step: Step,
    /// When the proxy started sending writes to the candidate (0 before `switched`).
    #[serde(default)]
    pub switched_ms: u64,
    /// The steps' log so far (the recovery event carries it).
    pub log: Vec<String>,
    /// How many times a restarted proxy took it up.
    #[serde(default)]
    pub resumed: u32,
}

/// The longest a test pause holds the controller.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(300);

/// The step named by `BREAKWATER_FAILOVER_PAUSE_AT`, if any (an unknown name is reported).
pub fn pause_at_from_env() -> Result<Option<Step>, String> {
    match std::env::var("BREAKWATER_FAILOVER_PAUSE_AT") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Step::parse(&v).map(Some).ok_or_else(|| {
            format!(
                "BREAKWATER_FAILOVER_PAUSE_AT={v:?} names no recovery step (one of {})",
                Step::ALL.map(|s| s.as_str()).join(", ")
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_ordered_and_named() {
        for w in Step::ALL.windows(2) {
            assert!(w[0] < w[1]);
        }
        for s in Step::ALL {
            assert_eq!(Step::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(Step::parse("nope"), None);
    }
}
