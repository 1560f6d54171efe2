//! MariaDB GTID positions: "domain-server-seqno" per replication domain, comma-separated
//! (e.g. `0-7-1042,1-9-15`). Within a domain, sequence numbers only grow (gtid_strict_mode),
//! so "has B everything A has" is a per-domain comparison of sequence numbers.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// domain -> last GTID applied/received in that domain.
    pub domains: BTreeMap<u32, Gtid>,
}

impl Position {
    /// Parse `@@gtid_*_pos` or `Gtid_IO_Pos`. Malformed parts are an error (never guessed).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut domains = BTreeMap::new();
        for g in Self::parse_all(s)? {
            domains.insert(g.domain, g);
        }
        Ok(Self { domains })
    }

    /// Every GTID of a comma-separated list, in order (a domain may appear more than once).
    fn parse_all(s: &str) -> Result<Vec<Gtid>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|part| {
                let mut it = part.splitn(3, '-');
                let parsed = (|| {
                    let domain = it.next()?.parse().ok()?;
                    let server = it.next()?.parse().ok()?;
                    let seq = it.next()?.parse().ok()?;
                    Some(Gtid { domain, server, seq })
                })();
                parsed.ok_or_else(|| format!("malformed GTID {part:?} in {s:?}"))
            })
            .collect()
    }

    /// True when this position includes every transaction `other` has.
    pub fn covers(&self, other: &Position) -> bool {
        other.domains.values().all(|o| self.domains.get(&o.domain).is_some_and(|m| m.seq >= o.seq))
    }

    /// Transactions this position has beyond `other`, per domain (what `other` would lose
    /// or, seen from a replica against its primary, errant transactions).
    pub fn beyond(&self, other: &Position) -> Vec<String> {
        self.domains
            .values()
            .filter_map(|m| match other.domains.get(&m.domain) {
                None => Some(format!("{}-{}-{} (domain {} unknown to the other side)", m.domain, m.server, m.seq, m.domain)),
                Some(o) if m.seq > o.seq => Some(format!("{}-{}-{}..{} ({} transactions)", m.domain, m.server, o.seq + 1, m.seq, m.seq - o.seq)),
                _ => None,
            })
            .collect()
    }

    /// Total of sequence numbers, to order positions that are not comparable by `covers`.
    pub fn weight(&self) -> u64 {
        self.domains.values().map(|g| g.seq).sum()
    }
}

/// `@@gtid_binlog_state`: the last sequence number of every (domain, server id) pair in a
/// server's binlog. Two servers with one history have the same pairs up to where one is
/// behind; a pair where one is ahead of the other, or that the other lacks, is a transaction
/// only the first has (an errant transaction on a replica; on a former primary, writes that
/// never reached its successor).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub pairs: BTreeMap<(u32, u32), u64>,
}

impl State {
    /// Parse `@@gtid_binlog_state`; malformed parts are an error (never guessed).
    pub fn parse(s: &str) -> Result<Self, String> {
        let p = Position::parse_all(s)?;
        let mut pairs = BTreeMap::new();
        for g in p {
            let e = pairs.entry((g.domain, g.server)).or_insert(g.seq);
            *e = (*e).max(g.seq);
        }
        Ok(Self { pairs })
    }

    /// Transactions this state has and `other` lacks, per (domain, server id), leaving out
    /// the server ids in `skip`; each as `domain-server-from..to (n transactions)`.
    pub fn beyond(&self, other: &State, skip: &[u32]) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|((_, s), _)| !skip.contains(s))
            .filter_map(|(&(d, s), &seq)| match other.pairs.get(&(d, s)) {
                None => Some(format!("{d}-{s}-1..{seq} (server {s} in domain {d} is not in the other history at all)")),
                Some(&o) if seq > o => Some(format!("{d}-{s}-{}..{seq} ({} transaction(s))", o + 1, seq - o)),
                _ => None,
            })
            .collect()
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.domains.values().map(|g| format!("{}-{}-{}", g.domain, g.server, g.seq)).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_compare() {
        let a = Position::parse("0-7-100,1-9-5").unwrap();
        let b = Position::parse("0-7-99").unwrap();
        assert!(a.covers(&b));
        assert!(!b.covers(&a));
        assert_eq!(a.to_string(), "0-7-100,1-9-5");
        assert_eq!(b.beyond(&a), Vec::<String>::new());
        assert_eq!(a.beyond(&b).len(), 2);
        assert!(Position::parse("").unwrap().domains.is_empty());
        assert!(Position::parse("0-7").is_err());
        assert!(Position::parse("x-1-2").is_err());
        // Same seqno from another server id still counts as the same point in the domain.
        assert!(Position::parse("0-8-100").unwrap().covers(&Position::parse("0-7-100").unwrap()));
    }

    #[test]
    fn binlog_state_pairs() {
        // The primary (server 7) wrote up to 0-7-120; server 8 was primary before, up to 0-8-40.
        let primary = State::parse("0-8-40,0-7-120").unwrap();
        // A replica behind, with the same history: nothing beyond.
        let replica = State::parse("0-8-40,0-7-110").unwrap();
        assert!(replica.beyond(&primary, &[]).is_empty());
        // An errant write on the replica (server 9), in domain 0 and in a new domain 1.
        let errant = State::parse("0-8-40,0-7-110,0-9-111,1-9-3").unwrap();
        let b = errant.beyond(&primary, &[]);
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(b[0].starts_with("0-9-1..111") && b[1].starts_with("1-9-1..3"), "{b:?}");
        // A former primary (7) that wrote 0-7-121..123 its successor (8) never got, while 8
        // went on from 0-7-120 with its own 0-8-121..
        let old = State::parse("0-8-40,0-7-123").unwrap();
        let new = State::parse("0-7-120,0-8-125").unwrap();
        assert_eq!(old.beyond(&new, &[]), vec!["0-7-121..123 (3 transaction(s))".to_string()]);
        // Skipping a server id (the primary's own, racing with a replica's probe).
        assert!(old.beyond(&new, &[7]).is_empty());
        assert!(State::parse("0-7").is_err());
    }
}
