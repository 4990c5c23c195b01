//! Pure: command-line framing (RFC 5321 §2.3.8, §4.5.3.1.4).
//!
//! Lines end in LF (the CR before it is stripped when present: clients that send bare LF in the
//! command phase are tolerated, as by Postfix; the DATA phase is strict, see `data`). A line of
//! more than [`MAX_LINE`] octets including its CRLF is reported as overlong so the caller can
//! reply `500 5.5.2` and discard up to the next LF without losing sync.

use memchr::memchr;

/// Command line limit including CRLF (RFC 5321 §4.5.3.1.4).
pub const MAX_LINE: usize = 512;

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

/// Frames the next command line.
#[inline]
pub fn next_line(input: &[u8]) -> Framed<'_> {
    let window = &input[..input.len().min(MAX_LINE)];
    match memchr(b'\n', window) {
        Some(lf) => {
            let line = &input[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Framed::Line(line, lf + 1)
        }
        None if input.len() < MAX_LINE => Framed::Partial,
        None => match memchr(b'\n', &input[MAX_LINE..]) {
            Some(off) => Framed::Overlong { consumed: MAX_LINE + off + 1, ended: true },
            None => Framed::Overlong { consumed: input.len(), ended: false },
        },
    }
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
}
