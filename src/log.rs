//! One-line events on stderr, as `text` (`ts=… event=… key=value`) or `json`.
//!
//! Lines are collected in a buffer and written once per loop turn ([`Logger::flush`]), so a
//! busy turn costs one `write` to stderr, not one per event.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// How events are written (`--log-format`; config converts the flag into this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `key=value` text lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A field value.
pub enum V<'a> {
    /// Text (escaped as needed).
    S(&'a str),
    /// Bytes from the wire (lossy UTF-8, escaped).
    B(&'a [u8]),
    /// A number.
    N(u64),
    /// Anything displayable.
    D(&'a dyn fmt::Display),
}

/// The event logger.
pub struct Logger {
    format: LogFormat,
    buf: String,
}

impl Logger {
    /// A logger writing in `format`.
    pub fn new(format: LogFormat) -> Logger {
        Logger { format, buf: String::with_capacity(64 * 1024) }
    }

    /// Records one event with its fields.
    pub fn event(&mut self, event: &str, fields: &[(&str, V<'_>)]) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let ts = format_args!("{}.{:03}", now.as_secs(), now.subsec_millis());
        match self.format {
            LogFormat::Text => {
                let _ = write!(self.buf, "ts={ts} event={event}");
                for (k, v) in fields {
                    let _ = write!(self.buf, " {k}=");
                    text_value(&mut self.buf, v);
                }
            }
            LogFormat::Json => {
                let _ = write!(self.buf, "{{\"ts\":{ts},\"event\":\"{event}\"");
                for (k, v) in fields {
                    let _ = write!(self.buf, ",\"{k}\":");
                    json_value(&mut self.buf, v);
                }
                self.buf.push('}');
            }
        }
        self.buf.push('\n');
        if self.buf.len() > 60 * 1024 {
            self.flush();
        }
    }

    /// Writes buffered lines to stderr.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            let _ = std::io::stderr().lock().write_all(self.buf.as_bytes());
            self.buf.clear();
        }
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.flush();
    }
}

fn text_value(out: &mut String, v: &V<'_>) {
    let s: std::borrow::Cow<'_, str> = match v {
        V::S(s) => (*s).into(),
        V::B(b) => String::from_utf8_lossy(b),
        V::N(n) => {
            let _ = write!(out, "{n}");
            return;
        }
        V::D(d) => d.to_string().into(),
    };
    let needs_quotes = s.is_empty() || s.bytes().any(|b| b <= b' ' || b == b'"' || b == b'=' || b == 0x7f);
    if !needs_quotes {
        out.push_str(&s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_value(out: &mut String, v: &V<'_>) {
    let s: std::borrow::Cow<'_, str> = match v {
        V::S(s) => (*s).into(),
        V::B(b) => String::from_utf8_lossy(b),
        V::N(n) => {
            let _ = write!(out, "{n}");
            return;
        }
        V::D(d) => d.to_string().into(),
    };
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let mut s = String::new();
        text_value(&mut s, &V::B(b"a b\r\n"));
        assert_eq!(s, "\"a b\\r\\n\"");
        let mut j = String::new();
        json_value(&mut j, &V::S("q\"\x01"));
        assert_eq!(j, "\"q\\\"\\u0001\"");
    }
}
