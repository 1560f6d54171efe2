//! A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux): just enough to find the
//! byte offset of a struct member, so kernel programs can read fields whose position depends
//! on the kernel's configuration (e.g. tcp_sock.srtt_us) without compiled-in offsets.

use anyhow::{anyhow, bail, Result};

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| anyhow!("BTF truncated at {off}"))
}

fn name_at(strings: &[u8], off: u32) -> &[u8] {
    let s = strings.get(off as usize..).unwrap_or(&[]);
    &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
}

/// Byte offset of `member` in `struct name` (top-level members only).
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Result<u32> {
    if btf.len() < 24 || u16::from_le_bytes([btf[0], btf[1]]) != 0xeb9f {
        bail!("not a little-endian BTF blob");
    }
    let hdr_len = u32_at(btf, 4)? as usize;
    let type_off = u32_at(btf, 8)? as usize;
    let type_len = u32_at(btf, 12)? as usize;
    let str_off = u32_at(btf, 16)? as usize;
    let str_len = u32_at(btf, 20)? as usize;
    let types = btf.get(hdr_len + type_off..hdr_len + type_off + type_len).ok_or_else(|| anyhow!("BTF type section out of range"))?;
    let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or_else(|| anyhow!("BTF string section out of range"))?;
    let mut pos = 0;
    while pos + 12 <= types.len() {
        let name_off = u32_at(types, pos)?;
        let info = u32_at(types, pos + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31;
        pos += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,                   // INT, VAR, DECL_TAG
            3 => 12,                            // ARRAY
            KIND_STRUCT | KIND_UNION => 12 * vlen,
            6 | 13 => 8 * vlen,                 // ENUM, FUNC_PROTO
            15 | 19 => 12 * vlen,               // DATASEC, ENUM64
            _ => 0,                             // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
        };
        if kind == KIND_STRUCT && name_at(strings, name_off) == strukt.as_bytes() {
            for i in 0..vlen {
                let m = pos + 12 * i;
                if name_at(strings, u32_at(types, m)?) == member.as_bytes() {
                    let bits = u32_at(types, m + 8)?;
                    let bit_off = if kind_flag == 1 { bits & 0xff_ffff } else { bits };
                    return Ok(bit_off / 8);
                }
            }
            bail!("struct {strukt} has no member {member}");
        }
        pos += extra;
    }
    bail!("struct {strukt} not found in BTF")
}

#[cfg(test)]
mod tests {
    use super::member_offset;

    #[test]
    fn finds_offsets_in_this_kernel() {
        let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else { return };
        // sock_common's layout has been fixed for many years (skc_num sits in an anonymous
        // union, so only top-level members are looked up).
        assert_eq!(member_offset(&btf, "sock_common", "skc_family").unwrap(), 16);
        let srtt = member_offset(&btf, "tcp_sock", "srtt_us").unwrap();
        assert!(srtt > 1000 && srtt < 4096, "{srtt}");
        let clock = member_offset(&btf, "tcp_sock", "tcp_clock_cache").unwrap();
        assert!(clock > 1000 && clock < 4096 && clock.is_multiple_of(8), "{clock}");
        assert!(member_offset(&btf, "tcp_sock", "no_such_member").is_err());
        assert!(member_offset(&[0u8; 8], "x", "y").is_err());
    }
}
