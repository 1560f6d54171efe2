//! Choosing the replica to promote: never a `must_not` server, never one that would lose
//! transactions another replica has received; then by promotion rule (prefer, neutral,
//! prefer_not), then the most advanced position, then the lowest address for determinism.

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

#[cfg(test)]
mod tests {
    use super::*;

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
