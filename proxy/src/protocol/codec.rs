//! Length-encoded integers and strings, and the OK / ERR / EOF packets.

use super::status;

/// Read a length-encoded integer at `*pos`, advancing it. `None` if truncated or NULL (0xfb).
pub fn read_lenenc(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *buf.get(*pos)?;
    let (val, len) = match first {
        0..=0xfa => (first as u64, 1),
        0xfc => (u16::from_le_bytes(buf.get(*pos + 1..*pos + 3)?.try_into().ok()?) as u64, 3),
        0xfd => {
            let b = buf.get(*pos + 1..*pos + 4)?;
            (u32::from_le_bytes([b[0], b[1], b[2], 0]) as u64, 4)
        }
        0xfe => (u64::from_le_bytes(buf.get(*pos + 1..*pos + 9)?.try_into().ok()?), 9),
        _ => return None,
    };
    *pos += len;
    Some(val)
}

pub fn put_lenenc(out: &mut Vec<u8>, v: u64) {
    if v < 0xfb {
        out.push(v as u8);
    } else if v <= 0xffff {
        out.push(0xfc);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= 0xff_ffff {
        out.push(0xfd);
        out.extend_from_slice(&(v as u32).to_le_bytes()[..3]);
    } else {
        out.push(0xfe);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub fn put_lenenc_str(out: &mut Vec<u8>, s: &[u8]) {
    put_lenenc(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// Read a length-encoded string.
pub fn read_lenenc_str<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = read_lenenc(buf, pos)? as usize;
    let s = buf.get(*pos..pos.checked_add(len)?)?;
    *pos += len;
    Some(s)
}

/// Read a NUL-terminated string (or the rest of the buffer when there is no NUL).
pub fn read_nul_str<'a>(buf: &'a [u8], pos: &mut usize) -> &'a [u8] {
    let rest = buf.get(*pos..).unwrap_or(&[]);
    match rest.iter().position(|&b| b == 0) {
        Some(n) => {
            *pos += n + 1;
            &rest[..n]
        }
        None => {
            *pos += rest.len();
            rest
        }
    }
}

/// An OK packet payload.
pub fn ok_packet(affected: u64, last_insert_id: u64, status_flags: u16, warnings: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(11);
    p.push(0x00);
    put_lenenc(&mut p, affected);
    put_lenenc(&mut p, last_insert_id);
    p.extend_from_slice(&status_flags.to_le_bytes());
    p.extend_from_slice(&warnings.to_le_bytes());
    p
}

/// An ERR packet payload (protocol 4.1 form with SQLSTATE).
pub fn err_packet(code: u16, sqlstate: &str, msg: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(9 + msg.len());
    p.push(0xff);
    p.extend_from_slice(&code.to_le_bytes());
    p.push(b'#');
    let st = sqlstate.as_bytes();
    for i in 0..5 {
        p.push(*st.get(i).unwrap_or(&b'0'));
    }
    p.extend_from_slice(msg.as_bytes());
    p
}

/// An EOF packet payload.
pub fn eof_packet(status_flags: u16, warnings: u16) -> Vec<u8> {
    let mut p = vec![0xfe];
    p.extend_from_slice(&warnings.to_le_bytes());
    p.extend_from_slice(&status_flags.to_le_bytes());
    p
}

/// Parsed fields of an OK packet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ok {
    pub affected_rows: u64,
    pub last_insert_id: u64,
    pub status: u16,
    pub warnings: u16,
}

pub fn parse_ok(payload: &[u8]) -> Option<Ok> {
    if payload.first() != Some(&0x00) && payload.first() != Some(&0xfe) {
        return None;
    }
    let mut pos = 1;
    let affected_rows = read_lenenc(payload, &mut pos)?;
    let last_insert_id = read_lenenc(payload, &mut pos)?;
    let status = u16::from_le_bytes(payload.get(pos..pos + 2)?.try_into().ok()?);
    let warnings = payload
        .get(pos + 2..pos + 4)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    Some(Ok { affected_rows, last_insert_id, status, warnings })
}

/// Status flags of an EOF packet (0xfe, warnings u16, status u16).
pub fn eof_status(payload: &[u8]) -> u16 {
    payload.get(3..5).map(|b| u16::from_le_bytes([b[0], b[1]])).unwrap_or(status::AUTOCOMMIT)
}

/// Warnings of an EOF packet.
pub fn eof_warnings(payload: &[u8]) -> u16 {
    payload.get(1..3).map(|b| u16::from_le_bytes([b[0], b[1]])).unwrap_or(0)
}

/// Parsed ERR packet.
#[derive(Debug, Clone)]
pub struct Err {
    pub code: u16,
    pub sqlstate: String,
    pub message: String,
}

pub fn parse_err(payload: &[u8]) -> Option<Err> {
    if payload.first() != Some(&0xff) || payload.len() < 3 {
        return None;
    }
    let code = u16::from_le_bytes([payload[1], payload[2]]);
    let (sqlstate, msg) = if payload.get(3) == Some(&b'#') && payload.len() >= 9 {
        (String::from_utf8_lossy(&payload[4..9]).into_owned(), &payload[9..])
    } else {
        ("HY000".to_string(), &payload[3..])
    };
    Some(Err { code, sqlstate, message: String::from_utf8_lossy(msg).into_owned() })
}


pub const TYPE_LONGLONG: u8 = 0x08;
pub const TYPE_VAR_STRING: u8 = 0xfd;
pub const FLAG_UNSIGNED: u16 = 0x20;

/// A column of a result set the proxy makes itself.
pub struct Column<'a> {
    pub name: &'a str,
    pub kind: u8,
    pub flags: u16,
}

/// Push a complete text-protocol result set (column count, definitions, EOF, rows, EOF;
/// the proxy does not offer CLIENT_DEPRECATE_EOF), sequence ids from 1.
pub fn push_text_result_set<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut super::packet::PacketWriter<W>,
    first_seq: u8,
    cols: &[Column<'_>],
    rows: &[Vec<Option<String>>],
    status_flags: u16,
) {
    let mut seq = first_seq;
    let mut p = Vec::new();
    put_lenenc(&mut p, cols.len() as u64);
    seq = wr.push(seq, &p);
    for c in cols {
        p.clear();
        for s in ["def", "", "", "", c.name, c.name] {
            put_lenenc_str(&mut p, s.as_bytes());
        }
        p.push(0x0c);
        p.extend_from_slice(&33u16.to_le_bytes()); // utf8_general_ci
        p.extend_from_slice(&(if c.kind == TYPE_LONGLONG { 20u32 } else { 1024 }).to_le_bytes());
        p.push(c.kind);
        p.extend_from_slice(&c.flags.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&[0, 0]);
        seq = wr.push(seq, &p);
    }
    seq = wr.push(seq, &eof_packet(status_flags, 0));
    for r in rows {
        p.clear();
        for v in r {
            match v {
                Some(s) => put_lenenc_str(&mut p, s.as_bytes()),
                None => p.push(0xfb),
            }
        }
        seq = wr.push(seq, &p);
    }
    wr.push(seq, &eof_packet(status_flags, 0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenenc_roundtrip() {
        for v in [0u64, 1, 250, 251, 0xffff, 0x10000, 0xff_ffff, 0x100_0000, u64::MAX] {
            let mut b = Vec::new();
            put_lenenc(&mut b, v);
            let mut pos = 0;
            assert_eq!(read_lenenc(&b, &mut pos), Some(v));
            assert_eq!(pos, b.len());
        }
        let mut pos = 0;
        assert_eq!(read_lenenc(&[0xfc, 1], &mut pos), None, "truncated");
        assert_eq!(read_lenenc(&[0xfb], &mut pos), None, "NULL");
    }

    #[test]
    fn ok_and_err_roundtrip() {
        let ok = parse_ok(&ok_packet(3, 70000, status::AUTOCOMMIT | status::IN_TRANS, 1)).unwrap();
        assert_eq!((ok.affected_rows, ok.last_insert_id, ok.status, ok.warnings), (3, 70000, 3, 1));
        let e = parse_err(&err_packet(1045, "28000", "Access denied")).unwrap();
        assert_eq!((e.code, e.sqlstate.as_str(), e.message.as_str()), (1045, "28000", "Access denied"));
        assert!(parse_err(&[0xff]).is_none());
        assert!(parse_ok(&[0x00, 0xfc]).is_none());
    }
}
