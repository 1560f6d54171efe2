//! A small SQL lexer: just enough to find statement boundaries, literals, user variables and
//! keywords without being fooled by strings or comments. Shared by the digest normaliser and
//! the statement classifier. Works on bytes; never allocates.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tok<'a> {
    /// Identifier or keyword (ASCII word chars, `$`, and any non-ASCII byte).
    Word(&'a [u8]),
    /// `backquoted` identifier, without the quotes.
    Quoted(&'a [u8]),
    /// 'string' or "string" literal, with its quotes.
    Str(&'a [u8]),
    /// Numeric literal (incl. 0x.., 1e5, .5), or X'..'/B'..' literal.
    Num(&'a [u8]),
    /// @name user variable (name without the @).
    UserVar(&'a [u8]),
    /// @@[scope.]name system variable (without the @@).
    SysVar(&'a [u8]),
    /// `?` placeholder.
    Placeholder,
    /// Any other punctuation; multi-char operators come as single chars.
    Punct(u8),
}

pub struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
    /// Whether whitespace or a comment came before the token last returned.
    pub space_before: bool,
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

impl<'a> Lexer<'a> {
    pub fn new(s: &'a [u8]) -> Self {
        Self { s, pos: 0, space_before: false }
    }

    /// Byte offset of the next unread byte.
    pub fn pos(&self) -> usize {
        self.pos
    }

    fn skip_space_and_comments(&mut self) {
        let s = self.s;
        loop {
            while self.pos < s.len() && s[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if s[self.pos..].starts_with(b"/*") {
                match s[self.pos + 2..].windows(2).position(|w| w == b"*/") {
                    Some(n) => self.pos += n + 4,
                    None => self.pos = s.len(),
                }
            } else if s[self.pos..].starts_with(b"#")
                || (s[self.pos..].starts_with(b"--")
                    && s.get(self.pos + 2).is_none_or(|b| b.is_ascii_whitespace()))
            {
                match s[self.pos..].iter().position(|&b| b == b'\n') {
                    Some(n) => self.pos += n + 1,
                    None => self.pos = s.len(),
                }
            } else {
                return;
            }
        }
    }

    fn quoted_end(&self, start: usize, q: u8) -> usize {
        let s = self.s;
        let mut i = start + 1;
        while i < s.len() {
            let b = s[i];
            if b == b'\\' && q != b'`' {
                i += 2;
                continue;
            }
            if b == q {
                if s.get(i + 1) == Some(&q) {
                    i += 2;
                    continue;
                }
                return i + 1;
            }
            i += 1;
        }
        s.len()
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Tok<'a>;

    fn next(&mut self) -> Option<Tok<'a>> {
        let before = self.pos;
        self.skip_space_and_comments();
        self.space_before = self.pos != before;
        let s = self.s;
        let start = self.pos;
        let b = *s.get(start)?;
        let tok = match b {
            b'\'' | b'"' => {
                self.pos = self.quoted_end(start, b);
                Tok::Str(&s[start..self.pos])
            }
            b'`' => {
                self.pos = self.quoted_end(start, b);
                let end = self.pos.saturating_sub(1).max(start + 1);
                Tok::Quoted(&s[start + 1..end])
            }
            b'@' => {
                if s.get(start + 1) == Some(&b'@') {
                    let mut i = start + 2;
                    while i < s.len() && (is_word(s[i]) || s[i] == b'.') {
                        i += 1;
                    }
                    self.pos = i;
                    Tok::SysVar(&s[start + 2..i])
                } else {
                    let mut i = start + 1;
                    if i < s.len() && matches!(s[i], b'\'' | b'"' | b'`') {
                        i = self.quoted_end(i, s[i]);
                    } else {
                        while i < s.len() && (is_word(s[i]) || s[i] == b'.') {
                            i += 1;
                        }
                    }
                    self.pos = i;
                    Tok::UserVar(&s[start + 1..i])
                }
            }
            b'0'..=b'9' => {
                let mut i = start + 1;
                if b == b'0' && matches!(s.get(i), Some(b'x' | b'X' | b'b' | b'B')) {
                    i += 1;
                    while i < s.len() && s[i].is_ascii_hexdigit() {
                        i += 1;
                    }
                } else {
                    while i < s.len() {
                        let c = s[i];
                        if c.is_ascii_digit() || c == b'.' {
                            i += 1;
                        } else if (c == b'e' || c == b'E')
                            && (s.get(i + 1).is_some_and(|d| d.is_ascii_digit())
                                || (matches!(s.get(i + 1), Some(b'+' | b'-'))
                                    && s.get(i + 2).is_some_and(|d| d.is_ascii_digit())))
                        {
                            i += 2;
                        } else {
                            break;
                        }
                    }
                }
                if i < s.len() && is_word(s[i]) {
                    // An identifier that starts with digits (e.g. 1abc).
                    while i < s.len() && is_word(s[i]) {
                        i += 1;
                    }
                    self.pos = i;
                    return Some(Tok::Word(&s[start..i]));
                }
                self.pos = i;
                Tok::Num(&s[start..i])
            }
            b'.' if s.get(start + 1).is_some_and(|d| d.is_ascii_digit()) => {
                let mut i = start + 1;
                while i < s.len() && s[i].is_ascii_digit() {
                    i += 1;
                }
                self.pos = i;
                Tok::Num(&s[start..i])
            }
            b'x' | b'X' | b'b' | b'B' if s.get(start + 1) == Some(&b'\'') => {
                self.pos = self.quoted_end(start + 1, b'\'');
                Tok::Num(&s[start..self.pos])
            }
            b'?' => {
                self.pos += 1;
                Tok::Placeholder
            }
            _ if is_word(b) => {
                let mut i = start + 1;
                while i < s.len() && is_word(s[i]) {
                    i += 1;
                }
                self.pos = i;
                Tok::Word(&s[start..i])
            }
            _ => {
                self.pos += 1;
                Tok::Punct(b)
            }
        };
        Some(tok)
    }
}

pub fn eq_ci(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let toks: Vec<Tok> = Lexer::new(b"SELECT /* c */ `a b`, 'it''s', @x, @@session.sql_mode, 1.5e3, ? -- tail\n;").collect();
        assert_eq!(
            toks,
            vec![
                Tok::Word(b"SELECT"),
                Tok::Quoted(b"a b"),
                Tok::Punct(b','),
                Tok::Str(b"'it''s'"),
                Tok::Punct(b','),
                Tok::UserVar(b"x"),
                Tok::Punct(b','),
                Tok::SysVar(b"session.sql_mode"),
                Tok::Punct(b','),
                Tok::Num(b"1.5e3"),
                Tok::Punct(b','),
                Tok::Placeholder,
                Tok::Punct(b';'),
            ]
        );
        // Unterminated strings and comments end at the end of input without panicking.
        assert_eq!(Lexer::new(b"'abc").count(), 1);
        assert_eq!(Lexer::new(b"/* abc").count(), 0);
        assert_eq!(Lexer::new(b"email = 'a@b.c'").filter(|t| matches!(t, Tok::UserVar(_))).count(), 0);
    }
}
