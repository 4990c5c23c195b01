//! Pure: the DATA scanner (RFC 5321 §4.1.1.4, §4.5.2) and BDAT chunk counting (RFC 3030).
//!
//! The scanner walks line ends with `memchr2(CR, LF)` — one call per line, never per byte —
//! and copies the runs between dot-stuffing dots into the body in bulk. The only end of data is
//! `CRLF . CRLF` (the first line may be `.` CRLF on its own). A CR not followed by LF, or an LF
//! not preceded by CR, taints the message: the scanner keeps reading to the real end, then the
//! message is refused, so `LF . CRLF` or `CR . CR` can never end data early and smuggle a
//! second message (SMTP smuggling, RFC 5321 §2.3.8).

use memchr::memchr2;

/// Why a finished DATA or BDAT transfer cannot be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taint {
    /// Bare CR or bare LF seen.
    BareLineEnding,
    /// More than the size limit.
    TooBig,
}

/// Incremental DATA scanner. Feed input with [`DataScanner::scan`] until it reports the end.
#[derive(Debug, Clone)]
pub struct DataScanner {
    line_start: bool,
    size: u64,
    limit: u64,
    taint: Option<Taint>,
}

/// Result of one [`DataScanner::scan`] call.
#[derive(Debug, PartialEq, Eq)]
pub struct Scanned {
    /// Input bytes used (the rest must be offered again, with more, on the next call).
    pub consumed: usize,
    /// The end-of-data line was consumed.
    pub done: bool,
}

impl DataScanner {
    /// A scanner for one message of at most `limit` body octets.
    pub fn new(limit: u64) -> DataScanner {
        DataScanner { line_start: true, size: 0, limit, taint: None }
    }

    /// Body octets seen so far (after unstuffing), counted even when discarding.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Why the message must be refused, if it must.
    pub fn taint(&self) -> Option<Taint> {
        self.taint
    }

    /// Scans `input`, appending unstuffed body octets to `body` while the message is clean.
    pub fn scan(&mut self, input: &[u8], body: &mut Vec<u8>) -> Scanned {
        let mut i = 0;
        let mut run = 0;
        let len = input.len();
        loop {
            if self.line_start {
                if i >= len {
                    break;
                }
                if input[i] == b'.' {
                    // Need to see what follows the dot before deciding.
                    if i + 1 >= len || (input[i + 1] == b'\r' && i + 2 >= len) {
                        break;
                    }
                    if input[i + 1] == b'\r' && input[i + 2] == b'\n' {
                        self.emit(&input[run..i], body);
                        return Scanned { consumed: i + 3, done: true };
                    }
                    // A stuffed dot: drop it, keep the rest of the line.
                    self.emit(&input[run..i], body);
                    i += 1;
                    run = i;
                }
                self.line_start = false;
            }
            match memchr2(b'\r', b'\n', &input[i..]) {
                None => {
                    i = len;
                    break;
                }
                Some(off) => {
                    let p = i + off;
                    if input[p] == b'\n' {
                        // LF without CR. The next line is not a line start: `LF . CRLF` must
                        // not end the data.
                        self.taint.get_or_insert(Taint::BareLineEnding);
                        i = p + 1;
                    } else if p + 1 >= len {
                        // CR at the end of the input: wait for the next octet.
                        i = p;
                        break;
                    } else if input[p + 1] == b'\n' {
                        i = p + 2;
                        self.line_start = true;
                    } else {
                        self.taint.get_or_insert(Taint::BareLineEnding);
                        i = p + 1;
                    }
                }
            }
        }
        self.emit(&input[run..i], body);
        Scanned { consumed: i, done: false }
    }

    #[inline]
    fn emit(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        self.size += bytes.len() as u64;
        if self.taint.is_some() {
            // Nothing of a tainted message is kept; free its memory early.
            body.clear();
            return;
        }
        if self.size > self.limit {
            self.taint = Some(Taint::TooBig);
            // Free the memory now: nothing of this message will be stored.
            body.clear();
            return;
        }
        body.extend_from_slice(bytes);
    }
}

/// Copies up to `remaining` octets of a BDAT chunk from `input` into `body` (unless the running
/// `size` exceeds `limit`, in which case they are counted and dropped). Returns bytes consumed.
pub fn bdat_take(input: &[u8], remaining: &mut u64, size: &mut u64, limit: u64, body: &mut Vec<u8>) -> usize {
    let n = (*remaining).min(input.len() as u64) as usize;
    *remaining -= n as u64;
    *size += n as u64;
    if *size <= limit {
        body.extend_from_slice(&input[..n]);
    } else if !body.is_empty() {
        body.clear();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(chunks: &[&[u8]], limit: u64) -> (Vec<u8>, Option<Taint>, usize, bool) {
        let mut s = DataScanner::new(limit);
        let mut body = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut total = 0;
        for c in chunks {
            pending.extend_from_slice(c);
            let r = s.scan(&pending, &mut body);
            total += r.consumed;
            pending.drain(..r.consumed);
            if r.done {
                return (body, s.taint(), total, true);
            }
        }
        (body, s.taint(), total, false)
    }

    #[test]
    fn simple_and_unstuffing() {
        let (b, t, n, d) = run(&[b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n"], 1000);
        assert!(d);
        assert_eq!(t, None);
        assert_eq!(b, b"Subject: x\r\n\r\n.dot\r\n");
        assert_eq!(n, 24);
    }

    #[test]
    fn empty_message() {
        let (b, t, n, d) = run(&[b".\r\n"], 1000);
        assert!(d && t.is_none() && b.is_empty() && n == 3);
    }

    #[test]
    fn smuggling_variants_do_not_end_data() {
        for evil in [&b"a\n.\r\nMAIL FROM:<x@y>\r\n"[..], b"a\r\n.\n", b"a\r.\r\n", b"a\n.\n"] {
            let mut input = evil.to_vec();
            input.extend_from_slice(b"tail\r\n.\r\n");
            let (b, t, n, d) = run(&[&input], 1000);
            assert!(d, "{:?}", String::from_utf8_lossy(evil));
            assert_eq!(n, input.len());
            assert_eq!(t, Some(Taint::BareLineEnding));
            assert!(b.len() <= input.len());
        }
    }

    #[test]
    fn too_big_is_read_to_the_end() {
        let (b, t, _, d) = run(&[b"0123456789\r\n0123456789\r\n.\r\n"], 15);
        assert!(d);
        assert_eq!(t, Some(Taint::TooBig));
        assert!(b.is_empty());
    }

    #[test]
    fn bdat_counts() {
        let mut rem = 5;
        let mut size = 0;
        let mut body = Vec::new();
        assert_eq!(bdat_take(b"abcdefg", &mut rem, &mut size, 100, &mut body), 5);
        assert_eq!(body, b"abcde");
        assert_eq!(rem, 0);
    }

    proptest! {
        /// Any split of the same stream gives the same body, taint and consumed count.
        #[test]
        fn split_invariance(body in proptest::collection::vec(prop_oneof![
                Just(b'a'), Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'x')], 0..200),
            cuts in proptest::collection::vec(0usize..220, 0..8)) {
            let mut stream = body.clone();
            stream.extend_from_slice(b"\r\n.\r\n");
            let whole = run(&[&stream], 1 << 20);
            let mut cuts = cuts;
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let parts: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0].min(stream.len())..w[1].min(stream.len())]).collect();
            let split = run(&parts, 1 << 20);
            prop_assert_eq!(whole, split);
        }
    }
}
