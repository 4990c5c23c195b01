//! DKIM "relaxed" canonicalization (RFC 6376 §3.4.2, §3.4.4) and the header fields of a
//! message, read where the bytes lie.
//!
//! Owns: splitting a message into its header fields and body, the relaxed form of one header
//! field, and the relaxed body fed to a hash in slices of the original bytes. Must never: copy
//! the body (the body is handed to the sink line by line, as runs of the input), or panic on
//! any input (the message is the peer's).

use memchr::memchr;

/// One header field of a message: offsets into the message bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Start of the field (its name).
    pub start: usize,
    /// End of the name (before the colon and any space before it).
    pub name_end: usize,
    /// Just past the colon.
    pub value_start: usize,
    /// Past the field's last CRLF (continuation lines included).
    pub end: usize,
}

impl Field {
    /// The field name as written.
    pub fn name<'a>(&self, msg: &'a [u8]) -> &'a [u8] {
        &msg[self.start..self.name_end]
    }

    /// The raw value: after the colon, up to and including the last CRLF.
    pub fn value<'a>(&self, msg: &'a [u8]) -> &'a [u8] {
        &msg[self.value_start..self.end]
    }
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Splits the header of `msg` (RFC 5322 §2.2: a field starts at a line that does not begin
/// with white space and runs over its continuation lines) into `fields`, cleared first, and
/// returns where the body starts (after the empty line; `msg.len()` when there is none).
/// A header line without a colon is skipped: it is no field, and verifiers skip it too.
pub fn split_header(msg: &[u8], fields: &mut Vec<Field>) -> usize {
    fields.clear();
    let mut pos = 0;
    while pos < msg.len() {
        let line_end = memchr(b'\n', &msg[pos..]).map_or(msg.len(), |i| pos + i + 1);
        let line = &msg[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            return line_end;
        }
        // The field runs over the continuation lines after it.
        let mut end = line_end;
        while end < msg.len() && is_wsp(msg[end]) {
            end = memchr(b'\n', &msg[end..]).map_or(msg.len(), |i| end + i + 1);
        }
        if let Some(colon) = memchr(b':', line) {
            let mut name_end = pos + colon;
            while name_end > pos && is_wsp(msg[name_end - 1]) {
                name_end -= 1;
            }
            if name_end > pos {
                fields.push(Field { start: pos, name_end, value_start: pos + colon + 1, end });
            }
        }
        pos = end;
    }
    msg.len()
}

/// Appends the relaxed form of a header field (RFC 6376 §3.4.2) to `out`: the name in lower
/// case, a colon, the value unfolded with each run of white space as one space and none at
/// either end, then CRLF.
pub fn relaxed_header(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.push(b':');
    relaxed_value(value, out);
    out.extend_from_slice(b"\r\n");
}

/// The value part of [`relaxed_header`] (no CRLF after it).
pub fn relaxed_value(value: &[u8], out: &mut Vec<u8>) {
    let mut space = false;
    let mut any = false;
    for &b in value {
        match b {
            // Unfolding deletes the line breaks; the white space after them stays a space.
            b'\r' | b'\n' => {}
            b' ' | b'\t' => space = true,
            _ => {
                if space && any {
                    out.push(b' ');
                }
                space = false;
                any = true;
                out.push(b);
            }
        }
    }
}

/// Feeds the relaxed form of a message body (RFC 6376 §3.4.4) to `sink`, in slices of `body`
/// itself wherever the canonical form is the original bytes: white space at the end of a line
/// is dropped, each run inside a line becomes one space, empty lines at the end are dropped,
/// and a non-empty body ends with CRLF. An empty body feeds nothing (RFC 6376 errata 5252:
/// the relaxed hash of an empty body is that of the empty string).
pub fn relaxed_body(body: &[u8], mut sink: impl FnMut(&[u8])) {
    // Empty lines are held back until a line with content shows they are not trailing.
    let mut empty_lines = 0usize;
    let spaces = memchr::memmem::Finder::new(b"  ");
    let mut pos = 0;
    while pos < body.len() {
        let (line, next) = match memchr(b'\n', &body[pos..]) {
            Some(i) => {
                let nl = pos + i;
                let end = if nl > pos && body[nl - 1] == b'\r' { nl - 1 } else { nl };
                (&body[pos..end], nl + 1)
            }
            None => (&body[pos..], body.len()),
        };
        pos = next;
        // Trailing white space goes first; what is left either has content or is empty.
        let mut len = line.len();
        while len > 0 && is_wsp(line[len - 1]) {
            len -= 1;
        }
        let line = &line[..len];
        if line.is_empty() {
            empty_lines += 1;
            continue;
        }
        for _ in 0..empty_lines {
            sink(b"\r\n");
        }
        empty_lines = 0;
        relaxed_line(line, &spaces, &mut sink);
        sink(b"\r\n");
    }
}

/// One body line without trailing white space: runs of white space become one space. Only a
/// tab or two spaces in a row start a run that changes anything, so those are found with
/// `memchr` and `spaces` (the body's one `memmem` finder of two spaces; each scan resumed
/// past its last find, never repeated) and a line of plain prose is fed in one slice.
fn relaxed_line(line: &[u8], spaces: &memchr::memmem::Finder<'_>, sink: &mut impl FnMut(&[u8])) {
    // The next tab and the next double space at or after `from` (`len`: none left).
    let next_tab = |from: usize| memchr(b'\t', &line[from..]).map_or(line.len(), |i| from + i);
    let next_double = |from: usize| spaces.find(&line[from..]).map_or(line.len(), |i| from + i);
    let (mut tab, mut double) = (next_tab(0), next_double(0));
    let mut start = 0;
    loop {
        let at = tab.min(double);
        if at == line.len() {
            break;
        }
        // A space just before a tab belongs to its run (two spaces would have been found).
        let run = if at > start && line[at - 1] == b' ' { at - 1 } else { at };
        let mut end = at + 1;
        while end < line.len() && is_wsp(line[end]) {
            end += 1;
        }
        sink(&line[start..run]);
        sink(b" ");
        start = end;
        if tab < end {
            tab = next_tab(end);
        }
        if double < end {
            double = next_double(end);
        }
    }
    sink(&line[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        relaxed_body(b, |s| out.extend_from_slice(s));
        out
    }

    fn headers(msg: &[u8]) -> (Vec<u8>, usize) {
        let mut fields = Vec::new();
        let start = split_header(msg, &mut fields);
        let mut out = Vec::new();
        for f in &fields {
            relaxed_header(f.name(msg), f.value(msg), &mut out);
        }
        (out, start)
    }

    /// RFC 6376 §3.4.5, the example message in relaxed/relaxed.
    #[test]
    fn rfc6376_example() {
        let msg = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n";
        let (h, start) = headers(msg);
        assert_eq!(h, b"a:X\r\nb:Y Z\r\n");
        assert_eq!(body(&msg[start..]), b" C\r\nD E\r\n");
    }

    #[test]
    fn body_table() {
        let cases: [(&[u8], &[u8]); 10] = [
            (b"", b""),
            (b"\r\n\r\n", b""),
            (b"a", b"a\r\n"),
            (b"a\r\n", b"a\r\n"),
            (b"a  b\t\tc \r\n", b"a b c\r\n"),
            (b"\r\na\r\n\r\n \r\n", b"\r\na\r\n"),
            (b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n"),
            (b"\tlead\r\n", b" lead\r\n"),
            (b"x \t\r\n\t\r\n", b"x\r\n"),
            (b"a b c\r\n", b"a b c\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(body(input), want, "input {:?}", String::from_utf8_lossy(input));
        }
    }

    /// RFC 6376 §3.4.4 b done the plain way, byte by byte: the reference for the fast one.
    fn relaxed_line_naive(line: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut in_run = false;
        for &b in line {
            if is_wsp(b) {
                in_run = true;
                continue;
            }
            if in_run {
                out.push(b' ');
                in_run = false;
            }
            out.push(b);
        }
        if in_run {
            out.push(b' ');
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn relaxed_line_matches_the_byte_by_byte_rule(line in proptest::collection::vec(
            proptest::sample::select(&b" \taz"[..]), 0..40)) {
            let mut out = Vec::new();
            let spaces = memchr::memmem::Finder::new(b"  ");
            relaxed_line(&line, &spaces, &mut |s: &[u8]| out.extend_from_slice(s));
            proptest::prop_assert_eq!(out, relaxed_line_naive(&line));
        }
    }

    #[test]
    fn plain_lines_go_in_one_slice() {
        let mut slices = 0;
        relaxed_body(b"one line of prose\r\n", |_| slices += 1);
        assert_eq!(slices, 2, "the line, then CRLF");
    }

    #[test]
    fn header_split_and_fold() {
        let msg = b"Received: from x\r\n\tby y\r\nSubject:  Hi\r\n  there \r\nnot a field\r\nTo:a@b\r\n\r\nbody";
        let mut fields = Vec::new();
        let start = split_header(msg, &mut fields);
        assert_eq!(&msg[start..], b"body");
        let names: Vec<&[u8]> = fields.iter().map(|f| f.name(msg)).collect();
        assert_eq!(names, [&b"Received"[..], b"Subject", b"To"]);
        let mut out = Vec::new();
        relaxed_header(fields[1].name(msg), fields[1].value(msg), &mut out);
        assert_eq!(out, b"subject:Hi there\r\n");
        // No empty line: all header, no body.
        assert_eq!(split_header(b"A: b\r\n", &mut fields), 6);
        assert_eq!(split_header(b"", &mut fields), 0);
    }
}
