//! Choosing the replica to promote.
//!
//! [`choose`] (the `orchestrator` policy, and switchover): never a `must_not` server, never
//! one that would lose transactions another replica has received; then by promotion rule
//! (prefer, neutral, prefer_not), then the most advanced position, then the lowest address
//! for determinism.
//!
//! [`plan`] (the `breakwater` policy): the same rules among the candidates the load gate
//! judged fit ([`super::gate`]); a fit candidate behind the most advanced replica is first
//! caught up from it (the donor), so choosing by load never loses a transaction another
//! replica has.

use super::gtid::Position;
use crate::config::PromotionRule;

#[derive(Debug, Clone)]
pub struct Replica {
    pub addr: String,
    pub rule: PromotionRule,
    /// Everything this replica has received (relay log included).
    pub received: Position,
    /// Has errant transactions: promoting it would spread them.
    pub errant: bool,
}

/// Returns the chosen address and, for the event log, why the others were passed over.
pub fn choose(replicas: &[Replica], want: Option<&str>) -> Result<(String, Vec<String>), String> {
    if replicas.is_empty() {
        return Err("no reachable replica to promote".into());
    }
    let mut notes = Vec::new();
    let mut ok: Vec<&Replica> = Vec::new();
    for r in replicas {
        let lost: Vec<String> = replicas
            .iter()
            .filter(|o| o.addr != r.addr && !r.received.covers(&o.received))
            .map(|o| format!("{} has {}", o.addr, o.received.beyond(&r.received).join(", ")))
            .collect();
        if r.rule == PromotionRule::MustNot {
            notes.push(format!("{}: promotion_rule must_not", r.addr));
        } else if r.errant {
            notes.push(format!("{}: has errant transactions", r.addr));
        } else if !lost.is_empty() {
            notes.push(format!("{}: would lose transactions ({})", r.addr, lost.join("; ")));
        } else {
            ok.push(r);
        }
    }
    if let Some(w) = want {
        return match ok.iter().find(|r| r.addr == w) {
            Some(r) => Ok((r.addr.clone(), notes)),
            None if replicas.iter().any(|r| r.addr == w) => {
                Err(format!("{w} cannot be promoted: {}", notes.iter().find(|n| n.starts_with(w)).cloned().unwrap_or_default()))
            }
            None => Err(format!("{w} is not a reachable replica of the primary")),
        };
    }
    ok.sort_by(|a, b| a.rule.cmp(&b.rule).then(b.received.weight().cmp(&a.received.weight())).then(a.addr.cmp(&b.addr)));
    match ok.first() {
        Some(r) => Ok((r.addr.clone(), notes)),
        None => Err(format!("no replica can be promoted safely: {}", notes.join("; "))),
    }
}

/// What the `breakwater` policy will do: promote `candidate`, first caught up from `donor`
/// when it is behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub candidate: String,
    pub donor: Option<String>,
    /// Why the others were passed over.
    pub notes: Vec<String>,
}

/// The breakwater policy's choice. `unfit` holds the candidates the load gate refused, each
/// with its reason; `want` (a person's `failover --to`) overrides the gate, never the other
/// rules.
pub fn plan(replicas: &[Replica], unfit: &[(String, String)], want: Option<&str>) -> Result<Plan, String> {
    if replicas.is_empty() {
        return Err("no reachable replica to promote".into());
    }
    // A replica that has everything every other one received can give it to the candidate.
    let complete = |r: &Replica| replicas.iter().all(|o| r.received.covers(&o.received));
    let fit = |r: &Replica| !unfit.iter().any(|(a, _)| *a == r.addr);
    let mut donors: Vec<&Replica> = replicas.iter().filter(|r| complete(r)).collect();
    donors.sort_by(|a, b| fit(b).cmp(&fit(a)).then(a.addr.cmp(&b.addr)));
    let donor = donors.first().map(|r| r.addr.clone());
    let mut notes = Vec::new();
    let mut ok: Vec<&Replica> = Vec::new();
    for r in replicas {
        let overridden = want == Some(r.addr.as_str());
        if r.rule == PromotionRule::MustNot {
            notes.push(format!("{}: promotion_rule must_not", r.addr));
        } else if r.errant {
            notes.push(format!("{}: has errant transactions", r.addr));
        } else if !complete(r) && donor.is_none() {
            notes.push(format!("{}: behind, and no replica has every transaction to catch it up from", r.addr));
        } else if let Some((_, why)) = unfit.iter().find(|(a, _)| *a == r.addr).filter(|_| !overridden) {
            notes.push(format!("{}: {why}", r.addr));
        } else {
            ok.push(r);
        }
    }
    if let Some(w) = want {
        return match ok.iter().find(|r| r.addr == w) {
            Some(r) => Ok(Plan { candidate: r.addr.clone(), donor: donor.filter(|_| !complete(r)), notes }),
            None if replicas.iter().any(|r| r.addr == w) => {
                Err(format!("{w} cannot be promoted: {}", notes.iter().find(|n| n.starts_with(w)).cloned().unwrap_or_default()))
            }
            None => Err(format!("{w} is not a reachable replica of the primary")),
        };
    }
    ok.sort_by(|a, b| a.rule.cmp(&b.rule).then(b.received.weight().cmp(&a.received.weight())).then(a.addr.cmp(&b.addr)));
    match ok.first() {
        Some(r) => Ok(Plan { candidate: r.addr.clone(), donor: donor.filter(|_| !complete(r)), notes }),
        None => Err(format!("no fit replica: {}", notes.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_skips_unfit_and_catches_up_from_the_most_advanced() {
        use PromotionRule::*;
        let weak = || ("a".to_string(), "throttled 60% of the time".to_string());
        // The seed's scenario: the weak replica is the most advanced.
        let v = vec![r("a", Neutral, "0-1-12"), r("b", Neutral, "0-1-10")];
        assert_eq!(choose(&v, None).unwrap().0, "a", "position only: the weak one");
        let p = plan(&v, &[weak()], None).unwrap();
        assert_eq!(p, Plan { candidate: "b".into(), donor: Some("a".into()), notes: vec!["a: throttled 60% of the time".into()] });
        // Everything fit: the most advanced, no catch-up.
        assert_eq!(plan(&v, &[], None).unwrap(), Plan { candidate: "a".into(), donor: None, notes: vec![] });
        // Only unfit candidates: no promotion, and the reason says why.
        let e = plan(&v, &[weak(), ("b".into(), "lag 45 s".into())], None).unwrap_err();
        assert!(e.contains("a: throttled") && e.contains("b: lag 45 s"), "{e}");
        // A person's --to overrides the gate (and is caught up when behind) ...
        let p = plan(&v, &[weak(), ("b".into(), "lag 45 s".into())], Some("b")).unwrap();
        assert_eq!((p.candidate.as_str(), p.donor.as_deref()), ("b", Some("a")));
        // ... but never must_not.
        let v2 = vec![r("a", Neutral, "0-1-12"), r("b", MustNot, "0-1-12")];
        assert!(plan(&v2, &[weak()], Some("b")).unwrap_err().contains("must_not"));
        // Diverged positions (each has what the other lacks): nobody can be caught up.
        let v3 = vec![r("a", Neutral, "0-1-12,1-2-5"), r("b", Neutral, "0-1-13")];
        let e = plan(&v3, &[], None).unwrap_err();
        assert!(e.contains("no replica has every transaction"), "{e}");
        // A prefer rule beats position, with a catch-up.
        let v4 = vec![r("a", Neutral, "0-1-12"), r("b", Prefer, "0-1-10")];
        assert_eq!(plan(&v4, &[], None).unwrap(), Plan { candidate: "b".into(), donor: Some("a".into()), notes: vec![] });
    }

    fn r(addr: &str, rule: PromotionRule, pos: &str) -> Replica {
        Replica { addr: addr.into(), rule, received: Position::parse(pos).unwrap(), errant: false }
    }

    #[test]
    fn most_advanced_wins_and_rules_apply() {
        use PromotionRule::*;
        let v = vec![r("a", Neutral, "0-1-10"), r("b", Neutral, "0-1-12")];
        assert_eq!(choose(&v, None).unwrap().0, "b");
        // "a" would lose b's transactions 11..12, so even prefer does not win.
        let v = vec![r("a", Prefer, "0-1-10"), r("b", Neutral, "0-1-12")];
        assert_eq!(choose(&v, None).unwrap().0, "b");
        let v = vec![r("a", Prefer, "0-1-12"), r("b", Neutral, "0-1-12")];
        assert_eq!(choose(&v, None).unwrap().0, "a");
        let v = vec![r("a", PreferNot, "0-1-12"), r("b", Neutral, "0-1-12")];
        assert_eq!(choose(&v, None).unwrap().0, "b");
        let v = vec![r("a", MustNot, "0-1-12"), r("b", Neutral, "0-1-12")];
        assert_eq!(choose(&v, None).unwrap().0, "b");
        // The only complete replica is must_not: nobody is promoted.
        let v = vec![r("a", MustNot, "0-1-12"), r("b", Neutral, "0-1-11")];
        let e = choose(&v, None).unwrap_err();
        assert!(e.contains("would lose") && e.contains("must_not"), "{e}");
        assert!(choose(&v, Some("a")).is_err());
        assert!(choose(&v, Some("zz")).unwrap_err().contains("not a reachable replica"));
        assert!(choose(&[], None).is_err());
    }
}
