//! Pure: command-line framing (RFC 5321 §2.3.8, §4.5.3.1.4).
//!
//! Lines end in LF (the CR before it is stripped when present: clients that send bare LF in the
//! command phase are tolerated, as by Postfix; the DATA phase is strict, see `data`). A line of
//! more than [`MAX_LINE`] octets including its CRLF is reported as overlong so the caller can
//! reply `500 5.5.2` and discard up to the next LF without losing sync. AUTH lines (the command
//! with its initial response, and each response to a challenge) are framed against the larger
//! [`MAX_AUTH_LINE`] with [`next_line_within`]. Framing never copies: a line is a view of the
//! caller's buffer, which must therefore hold [`MAX_AUTH_LINE`] octets.

use memchr::memchr;

/// Command line limit including CRLF (RFC 5321 §4.5.3.1.4).
pub const MAX_LINE: usize = 512;

/// Limit including CRLF on an AUTH command line and on each AUTH response line (RFC 4954 §4:
/// "up to 12288 octets"); longer ones get `500 5.5.6`.
pub const MAX_AUTH_LINE: usize = 12_288;

/// What [`next_line`] found at the front of the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed<'a> {
    /// A whole line (without CR LF) and the bytes it used up including the terminator.
    Line(&'a [u8], usize),
    /// No LF yet and still under the limit: read more.
    Partial,
    /// The line exceeds the limit. `consumed` bytes may be dropped; `ended` says whether its LF
    /// was among them (if not, keep discarding with [`skip_line`]).
    Overlong {
        /// Bytes to drop.
        consumed: usize,
        /// The terminating LF was seen.
        ended: bool,
    },
}

/// Frames the next command line (at most [`MAX_LINE`] octets).
#[inline]
pub fn next_line(input: &[u8]) -> Framed<'_> {
    next_line_within(input, MAX_LINE)
}

/// Frames the next line of at most `max` octets including its CRLF.
#[inline]
pub fn next_line_within(input: &[u8], max: usize) -> Framed<'_> {
    let window = &input[..input.len().min(max)];
    match memchr(b'\n', window) {
        Some(lf) => {
            let line = &input[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Framed::Line(line, lf + 1)
        }
        None if input.len() < max => Framed::Partial,
        None => match memchr(b'\n', &input[max..]) {
            Some(off) => Framed::Overlong { consumed: max + off + 1, ended: true },
            None => Framed::Overlong { consumed: input.len(), ended: false },
        },
    }
}

/// Whether `input` starts an `AUTH` command line, the one command that may run to
/// [`MAX_AUTH_LINE`] octets (RFC 4954 §4). The verb is followed by a space, as the command
/// parser requires.
#[inline]
pub fn is_auth_command(input: &[u8]) -> bool {
    input.len() > 4 && input[..4].eq_ignore_ascii_case(b"AUTH") && input[4] == b' '
}

/// While discarding the rest of an overlong line: returns (bytes to drop, LF seen).
#[inline]
pub fn skip_line(input: &[u8]) -> (usize, bool) {
    match memchr(b'\n', input) {
        Some(lf) => (lf + 1, true),
        None => (input.len(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(next_line(b"NOOP\r\nQUIT\r\n"), Framed::Line(b"NOOP", 6));
        assert_eq!(next_line(b"NOOP\nX"), Framed::Line(b"NOOP", 5));
        assert_eq!(next_line(b"NOO"), Framed::Partial);
        assert_eq!(next_line(b"\r\n"), Framed::Line(b"", 2));
    }

    #[test]
    fn limit_is_512_including_crlf() {
        let mut ok = vec![b'a'; 510];
        ok.extend_from_slice(b"\r\n");
        assert!(matches!(next_line(&ok), Framed::Line(_, 512)));
        let mut long = vec![b'a'; 511];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(next_line(&long), Framed::Overlong { consumed: 513, ended: true });
        let big = vec![b'a'; 4000];
        assert_eq!(next_line(&big), Framed::Overlong { consumed: 4000, ended: false });
        assert_eq!(skip_line(b"xx\r\nNOOP"), (4, true));
    }

    #[test]
    fn auth_limit_is_12288_including_crlf() {
        let mut ok = vec![b'A'; MAX_AUTH_LINE - 2];
        ok.extend_from_slice(b"\r\n");
        assert!(
            matches!(next_line_within(&ok, MAX_AUTH_LINE), Framed::Line(l, n) if l.len() == MAX_AUTH_LINE - 2 && n == MAX_AUTH_LINE)
        );
        assert!(matches!(next_line(&ok), Framed::Overlong { consumed: MAX_AUTH_LINE, ended: true }));
        assert_eq!(next_line_within(&ok[..MAX_AUTH_LINE - 1], MAX_AUTH_LINE), Framed::Partial);
        let mut long = vec![b'A'; MAX_AUTH_LINE - 1];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(
            next_line_within(&long, MAX_AUTH_LINE),
            Framed::Overlong { consumed: MAX_AUTH_LINE + 1, ended: true }
        );
        assert_eq!(
            next_line_within(&long[..MAX_AUTH_LINE], MAX_AUTH_LINE),
            Framed::Overlong { consumed: MAX_AUTH_LINE, ended: false }
        );
    }

    #[test]
    fn auth_command_prefix() {
        for (input, want) in [
            (&b"AUTH PLAIN x"[..], true),
            (b"auth login", true),
            (b"AuTh ", true),
            (b"AUTH", false),
            (b"AUTHX", false),
            (b"AUTH\tPLAIN", false),
            (b" AUTH PLAIN", false),
            (b"MAIL FROM:<>", false),
        ] {
            assert_eq!(is_auth_command(input), want, "{:?}", String::from_utf8_lossy(input));
        }
    }
}
