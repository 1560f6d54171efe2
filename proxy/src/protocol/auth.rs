//! Password scrambles for mysql_native_password and caching_sha2_password.
//!
//! The proxy never stores clear passwords for client authentication: a user entry holds
//! `*HEX(SHA1(SHA1(pw)))` (the mysql.user format) and/or `HEX(SHA256(SHA256(pw)))`.
//! Both are enough to verify a client's scramble without knowing the password.

use rand::Rng;
use sha1::{Digest, Sha1};
use sha2::Sha256;

pub const NATIVE: &str = "mysql_native_password";
pub const CACHING_SHA2: &str = "caching_sha2_password";

/// 20 random bytes, none of them NUL (clients treat the scramble as a C string).
pub fn new_scramble() -> [u8; 20] {
    let mut rng = rand::thread_rng();
    let mut s = [0u8; 20];
    for b in s.iter_mut() {
        *b = rng.gen_range(1..=127);
        if *b == b'$' {
            *b = b'%';
        }
    }
    s
}

fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// SHA1(SHA1(password)): what mysql.user stores for mysql_native_password (without '*' and hex).
pub fn native_stage2(password: &[u8]) -> [u8; 20] {
    sha1(&[&sha1(&[password])])
}

/// SHA256(SHA256(password)).
pub fn sha2_stage2(password: &[u8]) -> [u8; 32] {
    sha256(&[&sha256(&[password])])
}

/// The client side of mysql_native_password: SHA1(pw) XOR SHA1(scramble + SHA1(SHA1(pw))).
pub fn native_token(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = sha1(&[password]);
    let stage2 = sha1(&[&stage1]);
    let mix = sha1(&[scramble, &stage2]);
    stage1.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect()
}

/// Marks a backend "password" that is really SHA1(password) in hex: enough to log in with
/// mysql_native_password, and what the proxy stores for temporary users instead of the
/// password itself.
pub const STAGE1_PREFIX: &str = "\u{0}native-stage1:";

/// mysql_native_password's token from SHA1(password).
pub fn native_token_from_stage1(stage1: &[u8; 20], scramble: &[u8]) -> Vec<u8> {
    let stage2 = sha1(&[stage1]);
    let mix = sha1(&[scramble, &stage2]);
    stage1.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect()
}

/// SHA1(password), the native plugin's first stage.
pub fn native_stage1(password: &[u8]) -> [u8; 20] {
    sha1(&[password])
}

/// The client side of caching_sha2_password's fast path:
/// SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + scramble).
pub fn sha2_token(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let s1 = sha256(&[password]);
    let s2 = sha256(&[&s1]);
    let mix = sha256(&[&s2, scramble]);
    s1.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect()
}

/// Verify a mysql_native_password token against the stored SHA1(SHA1(pw)).
pub fn verify_native(token: &[u8], scramble: &[u8], stage2: &[u8; 20]) -> bool {
    if token.len() != 20 {
        return false;
    }
    let mix = sha1(&[scramble, stage2]);
    let stage1: Vec<u8> = token.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect();
    constant_eq(&sha1(&[&stage1]), stage2)
}

/// Verify a caching_sha2_password fast-path token against the stored SHA256(SHA256(pw)).
pub fn verify_sha2(token: &[u8], scramble: &[u8], stage2: &[u8; 32]) -> bool {
    if token.len() != 32 {
        return false;
    }
    let mix = sha256(&[stage2, scramble]);
    let stage1: Vec<u8> = token.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect();
    constant_eq(&sha256(&[&stage1]), stage2)
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_matches_mysql_password_function() {
        // SELECT PASSWORD('app') on MariaDB.
        assert_eq!(
            format!("*{}", to_hex(&native_stage2(b"app"))),
            "*5BCB3E6AC345B435C7C2E6B7949A04CE6F6563D3"
        );
    }

    #[test]
    fn tokens_verify_and_wrong_passwords_do_not() {
        let s = new_scramble();
        assert!(s.iter().all(|b| *b != 0));
        assert!(verify_native(&native_token(b"secret", &s), &s, &native_stage2(b"secret")));
        assert!(!verify_native(&native_token(b"wrong", &s), &s, &native_stage2(b"secret")));
        assert!(!verify_native(&[], &s, &native_stage2(b"secret")));
        assert!(verify_sha2(&sha2_token(b"secret", &s), &s, &sha2_stage2(b"secret")));
        assert!(!verify_sha2(&sha2_token(b"wrong", &s), &s, &sha2_stage2(b"secret")));
        assert_eq!(from_hex(&to_hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
        assert_eq!(from_hex("zz"), None);
    }
}
