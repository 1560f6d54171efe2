//! Routing: which hostgroup serves a query, and what a query does to its session.
//!
//! - [`rules`]: ordered query rules (ProxySQL's mysql_query_rules).
//! - [`digest`]: the query normaliser behind match_digest and digest statistics.
//! - [`classify`]: statement kind, replayable session state, and reasons to pin.
//! - [`tables`]: the tables a statement names (query cache invalidation).
//! - [`lexer`]: the tokenizer they share.

pub mod classify;
pub mod digest;
pub mod lexer;
pub mod rules;
pub mod tables;
