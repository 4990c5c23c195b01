//! Tokens: `kind | generation | slab key` packed in a `mio::Token`, so that an event for a
//! connection whose slab slot was reused by a newer connection is recognised and dropped.

use mio::Token;

/// What a token refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A listening socket (key = index in the listener list).
    Listener,
    /// An inbound SMTP connection (key = slab key).
    Inbound,
    /// The signal pipe.
    Signal,
    /// The waker of the spool sync thread.
    Waker,
    /// Reserved for outbound SMTP connections (delivery).
    Outbound,
    /// Reserved for the DNS socket.
    Dns,
    /// The control socket (key `u32::MAX`) and its clients (key = slab key).
    Control,
}

const KIND_SHIFT: u32 = 56;
const GEN_SHIFT: u32 = 32;
const GEN_MASK: u64 = 0x00ff_ffff;
const KEY_MASK: u64 = 0xffff_ffff;

/// Packs a token.
pub fn make(kind: Kind, generation: u32, key: usize) -> Token {
    let k = match kind {
        Kind::Listener => 1u64,
        Kind::Inbound => 2,
        Kind::Signal => 3,
        Kind::Outbound => 4,
        Kind::Dns => 5,
        Kind::Waker => 6,
        Kind::Control => 7,
    };
    Token(((k << KIND_SHIFT) | ((u64::from(generation) & GEN_MASK) << GEN_SHIFT) | (key as u64 & KEY_MASK)) as usize)
}

/// Unpacks a token into (kind, generation, key); `None` for tokens we never made.
pub fn split(t: Token) -> Option<(Kind, u32, usize)> {
    let v = t.0 as u64;
    let kind = match v >> KIND_SHIFT {
        1 => Kind::Listener,
        2 => Kind::Inbound,
        3 => Kind::Signal,
        4 => Kind::Outbound,
        5 => Kind::Dns,
        6 => Kind::Waker,
        7 => Kind::Control,
        _ => return None,
    };
    Some((kind, ((v >> GEN_SHIFT) & GEN_MASK) as u32, (v & KEY_MASK) as usize))
}

/// Generations wrap within 24 bits.
pub fn next_generation(g: u32) -> u32 {
    (g + 1) & GEN_MASK as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = make(Kind::Inbound, 0xabcdef, 12345);
        assert_eq!(split(t), Some((Kind::Inbound, 0xabcdef, 12345)));
        assert_eq!(split(Token(0)), None);
        let t = make(Kind::Control, 7, u32::MAX as usize);
        assert_eq!(split(t), Some((Kind::Control, 7, u32::MAX as usize)));
        assert_eq!(next_generation(0xff_ffff), 0);
    }
}
