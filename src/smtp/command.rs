//! Pure: SMTP command parsing (RFC 5321 §4.1) into borrowed views of the line.
//!
//! Verbs are matched as packed little-endian integers of their first four letters, lowercased
//! with one OR, so dispatch costs one load and one compare chain, not a string comparison.

use super::reply::{syntax, Fault};

/// A parsed command borrowing from its line.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `EHLO domain` (RFC 5321 §4.1.1.1).
    Ehlo(&'a [u8]),
    /// `HELO domain`.
    Helo(&'a [u8]),
    /// `MAIL FROM:<path> [params]`.
    Mail(Path<'a>, &'a [u8]),
    /// `RCPT TO:<path> [params]`.
    Rcpt(Path<'a>, &'a [u8]),
    /// `DATA`.
    Data,
    /// `BDAT size [LAST]` (RFC 3030).
    Bdat(u64, bool),
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY`.
    Vrfy,
    /// `EXPN`.
    Expn,
    /// `HELP`.
    Help,
    /// `STARTTLS` (RFC 3207) with whatever argument followed.
    StartTls(&'a [u8]),
    /// `AUTH mechanism [initial-response]` (RFC 4954).
    Auth(&'a [u8]),
}

/// A reverse or forward path with the angle brackets and any source route removed.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Path<'a> {
    /// `local@domain`, `postmaster`, or empty for the null path `<>`.
    pub addr: &'a [u8],
    /// The address has octets above 127 (needs SMTPUTF8).
    pub utf8: bool,
}

const fn pack(v: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*v) | 0x2020_2020
}

/// Parses one command line (without CRLF).
pub fn parse(line: &[u8]) -> Result<Command<'_>, Fault> {
    if line.len() < 4 {
        return Err(Fault::UnknownCommand);
    }
    let verb = u32::from_le_bytes([line[0], line[1], line[2], line[3]]) | 0x2020_2020;
    let rest = &line[4..];
    // Most verbs are exactly four letters followed by SP or the end of the line.
    let arg = match rest.first() {
        None => Some(&rest[..0]),
        Some(b' ') => Some(trim(&rest[1..])),
        Some(_) => None,
    };
    if memchr::memchr(0, line).is_some() {
        return Err(Fault::BadCommandBytes);
    }
    let no_arg = |cmd: Command<'static>, arg: Option<&[u8]>| match arg {
        Some([]) => Ok(cmd),
        Some(_) => Err(Fault::Syntax(syntax::NO_ARGS)),
        None => Err(Fault::UnknownCommand),
    };
    const EHLO: u32 = pack(b"ehlo");
    const HELO: u32 = pack(b"helo");
    const MAIL: u32 = pack(b"mail");
    const RCPT: u32 = pack(b"rcpt");
    const DATA: u32 = pack(b"data");
    const BDAT: u32 = pack(b"bdat");
    const RSET: u32 = pack(b"rset");
    const NOOP: u32 = pack(b"noop");
    const QUIT: u32 = pack(b"quit");
    const VRFY: u32 = pack(b"vrfy");
    const EXPN: u32 = pack(b"expn");
    const HELP: u32 = pack(b"help");
    const STAR: u32 = pack(b"star");
    const AUTH: u32 = pack(b"auth");
    match verb {
        EHLO | HELO => {
            let arg = arg.ok_or(Fault::UnknownCommand)?;
            let name = first_word(arg);
            if name.is_empty() || name.iter().any(|&b| b < 0x21 || b == 0x7f) {
                return Err(Fault::Syntax(syntax::HELO));
            }
            Ok(if verb == EHLO { Command::Ehlo(name) } else { Command::Helo(name) })
        }
        MAIL => {
            let arg = arg.ok_or(Fault::UnknownCommand)?;
            let rest = strip_prefix_ci(arg, b"from:").ok_or(Fault::Syntax(syntax::MAIL))?;
            let (path, params) = parse_path(rest, false).ok_or(Fault::BadSender)?;
            Ok(Command::Mail(path, params))
        }
        RCPT => {
            let arg = arg.ok_or(Fault::UnknownCommand)?;
            let rest = strip_prefix_ci(arg, b"to:").ok_or(Fault::Syntax(syntax::RCPT))?;
            let (path, params) = parse_path(rest, true).ok_or(Fault::BadRecipient)?;
            if path.addr.is_empty() {
                return Err(Fault::BadRecipient);
            }
            Ok(Command::Rcpt(path, params))
        }
        DATA => no_arg(Command::Data, arg),
        BDAT => {
            let arg = arg.ok_or(Fault::UnknownCommand)?;
            let mut words = arg.split(|&b| b == b' ').filter(|w| !w.is_empty());
            let size = words.next().and_then(parse_u64).ok_or(Fault::Syntax(syntax::BDAT))?;
            let last = match words.next() {
                None => false,
                Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
                Some(_) => return Err(Fault::Syntax(syntax::BDAT)),
            };
            if words.next().is_some() {
                return Err(Fault::Syntax(syntax::BDAT));
            }
            Ok(Command::Bdat(size, last))
        }
        RSET => no_arg(Command::Rset, arg),
        // NOOP and HELP may carry an argument, which is ignored (RFC 5321 §4.1.1.9, §4.1.1.8).
        NOOP => arg.map(|_| Command::Noop).ok_or(Fault::UnknownCommand),
        HELP => arg.map(|_| Command::Help).ok_or(Fault::UnknownCommand),
        QUIT => no_arg(Command::Quit, arg),
        VRFY => arg.map(|_| Command::Vrfy).ok_or(Fault::UnknownCommand),
        EXPN => arg.map(|_| Command::Expn).ok_or(Fault::UnknownCommand),
        STAR if line.len() >= 8 && line[4..8].eq_ignore_ascii_case(b"ttls") => match line.get(8) {
            None => Ok(Command::StartTls(b"")),
            Some(b' ') => Ok(Command::StartTls(trim(&line[9..]))),
            Some(_) => Err(Fault::UnknownCommand),
        },
        AUTH => arg.map(Command::Auth).ok_or(Fault::UnknownCommand),
        _ => Err(Fault::UnknownCommand),
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |p| p + 1);
    &s[start..end]
}

fn first_word(s: &[u8]) -> &[u8] {
    let end = memchr::memchr(b' ', s).unwrap_or(s.len());
    &s[..end]
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        // Tolerate `MAIL FROM: <a@b>` (a space after the colon), as most servers do.
        Some(trim(&s[prefix.len()..]))
    } else {
        None
    }
}

/// Parses a decimal number without sign; `None` on anything else or overflow.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    Some(v)
}

/// Character classes for address validation, one table lookup per octet.
const ATEXT: u8 = 1;
const LDH: u8 = 2;
const QTEXT: u8 = 4;

const fn classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        if b.is_ascii_alphanumeric() {
            c |= ATEXT | LDH;
        }
        if matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'/'
                | b'='
                | b'?'
                | b'^'
                | b'_'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'~'
        ) {
            c |= ATEXT;
        }
        if b == b'-' {
            c |= LDH;
        }
        // qtextSMTP: %d32-33 / %d35-91 / %d93-126.
        if (b >= 32 && b <= 126) && b != b'"' && b != b'\\' {
            c |= QTEXT;
        }
        // UTF-8 octets are allowed in atext, qtext and labels (RFC 6531 §3.3); whether the
        // transaction declared SMTPUTF8 is checked by the session.
        if b >= 0x80 {
            c |= ATEXT | LDH | QTEXT;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CLASS: [u8; 256] = classes();

/// Parses `<path>` (or a bare address, tolerated) at the start of `s`; returns the path and the
/// parameter text after it. `allow_postmaster`: accept `<postmaster>` without a domain (RCPT).
pub fn parse_path(s: &[u8], allow_postmaster: bool) -> Option<(Path<'_>, &[u8])> {
    let (inner, rest) = if s.first() == Some(&b'<') {
        let close = find_close(s)?;
        (&s[1..close], &s[close + 1..])
    } else {
        // No brackets: the address runs to the first space.
        let end = memchr::memchr(b' ', s).unwrap_or(s.len());
        (&s[..end], &s[end..])
    };
    if !rest.is_empty() && rest[0] != b' ' {
        return None;
    }
    let rest = trim(rest);
    if inner.is_empty() {
        return Some((Path { addr: inner, utf8: false }, rest));
    }
    // A source route `@a,@b:` is ignored (RFC 5321 §4.1.2, Appendix C).
    let addr = if inner[0] == b'@' {
        let colon = memchr::memchr(b':', inner)?;
        &inner[colon + 1..]
    } else {
        inner
    };
    if allow_postmaster && addr.eq_ignore_ascii_case(b"postmaster") {
        return Some((Path { addr, utf8: false }, rest));
    }
    if addr.len() > 254 {
        return None;
    }
    let at = valid_local_part(addr)?;
    if at > 64 || !valid_domain(&addr[at + 1..]) {
        return None;
    }
    let utf8 = addr.iter().any(|&b| b >= 0x80);
    if utf8 && std::str::from_utf8(addr).is_err() {
        return None;
    }
    Some((Path { addr, utf8 }, rest))
}

/// Finds the `>` closing a path, skipping any inside a quoted local part.
fn find_close(s: &[u8]) -> Option<usize> {
    let mut i = 1;
    let mut quoted = false;
    while i < s.len() {
        match s[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Validates `Local-part "@"` at the start of `addr`; returns the index of the `@`.
fn valid_local_part(addr: &[u8]) -> Option<usize> {
    if addr.first() == Some(&b'"') {
        let mut i = 1;
        while i < addr.len() {
            match addr[i] {
                b'\\' => {
                    let n = *addr.get(i + 1)?;
                    if !(32..=126).contains(&n) {
                        return None;
                    }
                    i += 2;
                }
                b'"' => {
                    return (addr.get(i + 1) == Some(&b'@')).then_some(i + 1);
                }
                b if CLASS[b as usize] & QTEXT != 0 => i += 1,
                _ => return None,
            }
        }
        return None;
    }
    let at = memchr::memrchr(b'@', addr)?;
    let local = &addr[..at];
    // Dot-string: atoms separated by single dots.
    if local.is_empty() || local[0] == b'.' || local[local.len() - 1] == b'.' {
        return None;
    }
    let mut prev_dot = false;
    for &b in local {
        if b == b'.' {
            if prev_dot {
                return None;
            }
            prev_dot = true;
        } else if CLASS[b as usize] & ATEXT != 0 {
            prev_dot = false;
        } else {
            return None;
        }
    }
    Some(at)
}

/// Domain (labels of letters, digits, hyphens) or an address literal `[...]`.
pub fn valid_domain(d: &[u8]) -> bool {
    if d.is_empty() || d.len() > 253 {
        return false;
    }
    if d[0] == b'[' {
        return valid_address_literal(d);
    }
    d.split(|&b| b == b'.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label[0] != b'-'
            && label[label.len() - 1] != b'-'
            && label.iter().all(|&b| CLASS[b as usize] & LDH != 0)
    })
}

fn valid_address_literal(d: &[u8]) -> bool {
    let Some(inner) = d.strip_prefix(b"[").and_then(|r| r.strip_suffix(b"]")) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(inner) else {
        return false;
    };
    if let Some(v6) = text.strip_prefix("IPv6:").or_else(|| text.strip_prefix("ipv6:")) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    text.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Iterates `KEY[=VALUE]` parameters separated by spaces (RFC 5321 §4.1.2 Mail-parameters).
pub fn params(s: &[u8]) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
    s.split(|&b| b == b' ').filter(|p| !p.is_empty()).map(|p| match memchr::memchr(b'=', p) {
        Some(eq) => (&p[..eq], Some(&p[eq + 1..])),
        None => (p, None),
    })
}

/// Validates xtext (RFC 3461 §4): printable ASCII except `+` and `=`, or `+XX` hex escapes.
pub fn valid_xtext(s: &[u8]) -> bool {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => {
                let hex = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
                if !(s.get(i + 1).is_some_and(|&b| hex(b)) && s.get(i + 2).is_some_and(|&b| hex(b))) {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if s[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(addr: &[u8]) -> Path<'_> {
        Path { addr, utf8: false }
    }

    #[test]
    fn verbs() {
        assert_eq!(parse(b"EHLO client.example"), Ok(Command::Ehlo(b"client.example")));
        assert_eq!(parse(b"ehlo [127.0.0.1]"), Ok(Command::Ehlo(b"[127.0.0.1]")));
        assert_eq!(parse(b"HeLo x"), Ok(Command::Helo(b"x")));
        assert_eq!(parse(b"DATA"), Ok(Command::Data));
        assert_eq!(parse(b"data x"), Err(Fault::Syntax(syntax::NO_ARGS)));
        assert_eq!(parse(b"DATAX"), Err(Fault::UnknownCommand));
        assert_eq!(parse(b"NOOP hello"), Ok(Command::Noop));
        assert_eq!(parse(b"QUIT"), Ok(Command::Quit));
        assert_eq!(parse(b"STARTTLS"), Ok(Command::StartTls(b"")));
        assert_eq!(parse(b"STARTTLSX"), Err(Fault::UnknownCommand));
        assert_eq!(parse(b"BDAT 100 LAST"), Ok(Command::Bdat(100, true)));
        assert_eq!(parse(b"BDAT 0"), Ok(Command::Bdat(0, false)));
        assert_eq!(parse(b"BDAT x"), Err(Fault::Syntax(syntax::BDAT)));
        assert_eq!(parse(b"BDAT 1 LAST more"), Err(Fault::Syntax(syntax::BDAT)));
        assert_eq!(parse(b"FOO"), Err(Fault::UnknownCommand));
        assert_eq!(parse(b"EHLO"), Err(Fault::Syntax(syntax::HELO)));
        assert_eq!(parse(b"NOOP\0"), Err(Fault::BadCommandBytes));
        assert_eq!(parse(b"MAIL FROM:<a@b>\0"), Err(Fault::BadCommandBytes));
    }

    #[test]
    fn mail_and_rcpt() {
        assert_eq!(parse(b"MAIL FROM:<a@b.example>"), Ok(Command::Mail(path(b"a@b.example"), b"")));
        assert_eq!(
            parse(b"mail from: <a@b.example> SIZE=10 BODY=8BITMIME"),
            Ok(Command::Mail(path(b"a@b.example"), b"SIZE=10 BODY=8BITMIME"))
        );
        assert_eq!(parse(b"MAIL FROM:<>"), Ok(Command::Mail(path(b""), b"")));
        assert_eq!(parse(b"MAIL FROM:a@b"), Ok(Command::Mail(path(b"a@b"), b"")));
        assert_eq!(parse(b"MAIL TO:<a@b>"), Err(Fault::Syntax(syntax::MAIL)));
        assert_eq!(parse(b"MAIL FROM:<a@>"), Err(Fault::BadSender));
        assert_eq!(parse(b"MAIL FROM:<a@b"), Err(Fault::BadSender));
        assert_eq!(parse(b"MAIL FROM:<a..b@c>"), Err(Fault::BadSender));
        assert_eq!(parse(b"RCPT TO:<postmaster>"), Ok(Command::Rcpt(path(b"postmaster"), b"")));
        assert_eq!(parse(b"RCPT TO:<>"), Err(Fault::BadRecipient));
        assert_eq!(
            parse(b"RCPT TO:<@relay.example,@x.example:u@d.example>"),
            Ok(Command::Rcpt(path(b"u@d.example"), b""))
        );
        assert_eq!(parse(b"RCPT TO:<\"john doe\"@d.example>"), Ok(Command::Rcpt(path(b"\"john doe\"@d.example"), b"")));
        assert_eq!(
            parse(b"RCPT TO:<\"a>b\"@d.example> NOTIFY=NEVER"),
            Ok(Command::Rcpt(path(b"\"a>b\"@d.example"), b"NOTIFY=NEVER"))
        );
        assert_eq!(parse(b"RCPT TO:<u@[192.0.2.1]>"), Ok(Command::Rcpt(path(b"u@[192.0.2.1]"), b"")));
        assert_eq!(parse(b"RCPT TO:<u@[IPv6:2001:db8::1]>"), Ok(Command::Rcpt(path(b"u@[IPv6:2001:db8::1]"), b"")));
        assert_eq!(parse(b"RCPT TO:<u@[300.1.1.1]>"), Err(Fault::BadRecipient));
        assert_eq!(parse(b"RCPT TO:<u@-bad.example>"), Err(Fault::BadRecipient));
        let utf = "RCPT TO:<용@例え.jp>".as_bytes();
        match parse(utf) {
            Ok(Command::Rcpt(p, _)) => assert!(p.utf8),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn xtext_and_params() {
        assert!(valid_xtext(b"abc+2Bdef"));
        assert!(!valid_xtext(b"abc+2"));
        assert!(!valid_xtext(b"a=b"));
        assert!(!valid_xtext(b"a\x01"));
        let v: Vec<_> = params(b"SIZE=10  SMTPUTF8").collect();
        assert_eq!(v, vec![(&b"SIZE"[..], Some(&b"10"[..])), (&b"SMTPUTF8"[..], None)]);
    }
}
