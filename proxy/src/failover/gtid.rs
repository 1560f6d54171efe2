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
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut it = part.splitn(3, '-');
            let parsed = (|| {
                let domain = it.next()?.parse().ok()?;
                let server = it.next()?.parse().ok()?;
                let seq = it.next()?.parse().ok()?;
                Some(Gtid { domain, server, seq })
            })();
            let g = parsed.ok_or_else(|| format!("malformed GTID {part:?} in {s:?}"))?;
            domains.insert(g.domain, g);
        }
        Ok(Self { domains })
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
}
