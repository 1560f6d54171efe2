//! Time the digest normaliser on typical queries:
//! `cargo run --release -p breakwater-proxy --example digest_speed`.
fn main() {
    let queries: [&[u8]; 4] = [
        b"SELECT c FROM sbtest1 WHERE id=4711",
        b"SELECT DISTINCT c FROM sbtest3 WHERE id BETWEEN 100 AND 199 ORDER BY c",
        b"UPDATE sbtest2 SET k=k+1 WHERE id=5012",
        b"INSERT INTO orders (customer_id, amount, note) VALUES (42, 19.99, 'first order'), (43, 5.00, 'x')",
    ];
    let mut out = String::new();
    let n = 1_000_000;
    let t = std::time::Instant::now();
    for i in 0..n {
        breakwater_proxy::router::digest::digest_into(queries[i % 4], &mut out);
        std::hint::black_box(&out);
    }
    let per = t.elapsed().as_nanos() as f64 / n as f64;
    println!("digest: {per:.0} ns per query (mean over {n} queries of 4 shapes); last: {out}");
}
