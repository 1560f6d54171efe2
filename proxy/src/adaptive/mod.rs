//! The adaptive loop, part 1: what the agents on the database hosts report (`signals`),
//! what the proxy sees itself (`backend`), and the pure policies fed by them (`limit`).
//! Policies hold no I/O: they are state machines unit-tested on recorded series.

pub mod backend;
pub mod limit;
pub mod signals;
pub mod view;
