//! Collation ids sent in handshakes, and the names `SET NAMES` needs to reproduce them.

/// (collation id, charset, collation) for the collations clients commonly send.
const COLLATIONS: &[(u8, &str, &str)] = &[
    (8, "latin1", "latin1_swedish_ci"),
    (11, "ascii", "ascii_general_ci"),
    (28, "gbk", "gbk_chinese_ci"),
    (33, "utf8mb3", "utf8mb3_general_ci"),
    (45, "utf8mb4", "utf8mb4_general_ci"),
    (46, "utf8mb4", "utf8mb4_bin"),
    (47, "latin1", "latin1_bin"),
    (48, "latin1", "latin1_general_ci"),
    (63, "binary", "binary"),
    (83, "utf8mb3", "utf8mb3_bin"),
    (192, "utf8mb3", "utf8mb3_unicode_ci"),
    (224, "utf8mb4", "utf8mb4_unicode_ci"),
];

/// The collation backends are connected with.
pub const BACKEND_COLLATION: u8 = 45;

/// Charset and collation names for a handshake collation id. MySQL 8 clients send 255
/// (utf8mb4_0900_ai_ci), which MariaDB does not have: it gets utf8mb4's default, as MariaDB does.
pub fn by_id(id: u8) -> (&'static str, &'static str) {
    COLLATIONS
        .iter()
        .find(|(i, _, _)| *i == id)
        .map(|(_, cs, coll)| (*cs, *coll))
        .unwrap_or(("utf8mb4", "utf8mb4_general_ci"))
}
