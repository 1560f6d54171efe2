//! Query rules (ProxySQL's mysql_query_rules): ordered by rule_id; a rule matches on user,
//! schema, a regex of the query text and/or of its digest; the first matching rule with
//! `apply` decides the destination hostgroup (a matching rule without `apply` records its
//! destination and lets later rules override it).

use crate::config::QueryRule;
use regex::{Regex, RegexBuilder};

#[derive(Debug)]
struct Compiled {
    rule_id: u32,
    username: Option<String>,
    schemaname: Option<String>,
    pattern: Option<Regex>,
    digest: Option<Regex>,
    negate: bool,
    destination: Option<u32>,
    apply: bool,
    cache_ttl_ms: Option<u64>,
    cache_stale_ms: Option<u64>,
    cache_stale_if_error_ms: Option<u64>,
    shed_priority: Option<u32>,
}

#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Compiled>,
    needs_digest: bool,
    caches: bool,
    /// Unique per loaded rule set (0: none loaded); see cache::Route.
    generation: u64,
}

static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What the matching rules decided: destination and caching (the last matching rule that
/// sets each wins, up to the first rule with `apply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    pub rule_id: u32,
    pub hostgroup: Option<u32>,
    pub cache_ttl_ms: u64,
    pub cache_stale_ms: u64,
    pub cache_stale_if_error_ms: u64,
    /// Sheddable under a cascading risk when > 0 (see `QueryRule::shed_priority`).
    pub shed_priority: u32,
    /// The generation of the rules that decided (cache::Route).
    pub rules_generation: u64,
}

fn compile(re: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(re).case_insensitive(true).dot_matches_new_line(true).build()
}

impl Rules {
    pub fn new(rules: &[QueryRule]) -> Result<Self, regex::Error> {
        let mut out = Vec::new();
        for r in rules.iter().filter(|r| r.active) {
            out.push(Compiled {
                rule_id: r.rule_id,
                username: r.username.clone(),
                schemaname: r.schemaname.clone(),
                pattern: r.match_pattern.as_deref().map(compile).transpose()?,
                digest: r.match_digest.as_deref().map(compile).transpose()?,
                negate: r.negate_match_pattern,
                destination: r.destination_hostgroup,
                apply: r.apply,
                cache_ttl_ms: r.cache_ttl,
                cache_stale_ms: r.cache_stale_while_revalidate,
                cache_stale_if_error_ms: r.cache_stale_if_error_ms,
                shed_priority: r.shed_priority,
            });
        }
        out.sort_by_key(|r| r.rule_id);
        let needs_digest = out.iter().any(|r| r.digest.is_some());
        let caches = out.iter().any(|r| r.cache_ttl_ms.is_some_and(|t| t > 0));
        let generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Self { rules: out, needs_digest, caches, generation })
    }

    pub fn needs_digest(&self) -> bool {
        self.needs_digest
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether any rule caches results (writes then invalidate by table).
    pub fn caches(&self) -> bool {
        self.caches
    }

    /// Route a query. `digest` must be Some when `needs_digest()`.
    pub fn route(&self, user: &str, schema: Option<&str>, query: &str, digest: Option<&str>) -> Option<Decision> {
        let mut found: Option<Decision> = None;
        for r in &self.rules {
            if r.username.as_deref().is_some_and(|u| u != user) {
                continue;
            }
            if r.schemaname.as_deref().is_some_and(|s| Some(s) != schema) {
                continue;
            }
            if let Some(re) = &r.digest {
                if !re.is_match(digest.unwrap_or(query)) {
                    continue;
                }
            }
            if let Some(re) = &r.pattern {
                if re.is_match(query) == r.negate {
                    continue;
                }
            }
            let d = found.get_or_insert_with(|| Decision { rules_generation: self.generation, ..Decision::default() });
            d.rule_id = r.rule_id;
            if let Some(hg) = r.destination {
                d.hostgroup = Some(hg);
            }
            if let Some(ttl) = r.cache_ttl_ms {
                d.cache_ttl_ms = ttl;
            }
            if let Some(st) = r.cache_stale_ms {
                d.cache_stale_ms = st;
            }
            if let Some(st) = r.cache_stale_if_error_ms {
                d.cache_stale_if_error_ms = st;
            }
            if let Some(sp) = r.shed_priority {
                d.shed_priority = sp;
            }
            if r.apply {
                break;
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_TOML};
    use crate::router::digest::digest;

    fn route(rules: &Rules, q: &str) -> Option<u32> {
        let d = digest(q.as_bytes());
        rules.route("app", Some("sbtest"), q, Some(&d)).and_then(|d| d.hostgroup)
    }

    #[test]
    fn default_rules_split_reads_and_writes() {
        let cfg = Config::from_toml(DEFAULT_TOML).unwrap();
        let rules = Rules::new(&cfg.query_rules).unwrap();
        assert!(rules.needs_digest());
        assert_eq!(route(&rules, "SELECT c FROM sbtest1 WHERE id=1"), Some(20));
        assert_eq!(route(&rules, "select c from sbtest1 where id=1 for update"), Some(10));
        assert_eq!(route(&rules, "SELECT c FROM t WHERE id=1 LOCK IN SHARE MODE"), Some(10));
        assert_eq!(route(&rules, "/* c */ SELECT 1"), Some(20));
        assert_eq!(route(&rules, "UPDATE sbtest1 SET k=k+1 WHERE id=1"), None);
    }

    #[test]
    fn user_schema_and_non_apply_rules() {
        let rules = Rules::new(&[
            QueryRule {
                rule_id: 1,
                active: true,
                username: Some("report".into()),
                schemaname: None,
                match_pattern: Some("^SELECT".into()),
                match_digest: None,
                negate_match_pattern: false,
                destination_hostgroup: Some(30),
                apply: false,
                ..Default::default()
            },
            QueryRule {
                rule_id: 2,
                active: true,
                username: None,
                schemaname: Some("other".into()),
                match_pattern: None,
                match_digest: None,
                negate_match_pattern: false,
                destination_hostgroup: Some(40),
                apply: true,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(rules.route("report", Some("x"), "select 1", None).and_then(|d| d.hostgroup), Some(30));
        assert_eq!(rules.route("report", Some("other"), "select 1", None).and_then(|d| d.hostgroup), Some(40));
        assert_eq!(rules.route("app", Some("x"), "select 1", None).and_then(|d| d.hostgroup), None);
    }
}
