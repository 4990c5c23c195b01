//! Pure: the DNS message codec (RFC 1035 §4, EDNS0 RFC 6891), the one file that names
//! `hickory-proto` types.
//!
//! Owns: turning a question into query bytes ([`encode_query`]) and response bytes into plain
//! structs ([`decode_answer`]) that the rest of `dns` works with, so that a hickory upgrade
//! touches only this file. Must never: keep state, read the clock, or panic on peer bytes
//! (every decode failure is a [`WireError`]).
//!
//! Names leave this module in one canonical form: lower-case ASCII (IDNA names as `xn--`
//! A-labels), without the trailing dot; the root name is the empty string.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

/// UDP payload size we advertise in EDNS0: the DNS Flag Day 2020 value, small enough never to
/// be fragmented on common paths (RFC 6891 §6.2.5; larger answers come back with TC → TCP).
pub const EDNS_UDP_SIZE: u16 = 1232;

/// Longest name in presentation form we accept (RFC 1035 §2.3.4: 255 octets on the wire).
const MAX_NAME_LEN: usize = 253;

/// The record types sluice asks for (RFC 1035 §3.2.2, RFC 3596 §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QType {
    /// Mail exchanger (RFC 1035 §3.3.9), type 15.
    Mx,
    /// IPv4 address (RFC 1035 §3.4.1), type 1.
    A,
    /// IPv6 address (RFC 3596 §2.1), type 28.
    Aaaa,
}

impl QType {
    /// Every type, in [`QType::index`] order.
    pub const ALL: [QType; 3] = [QType::Mx, QType::A, QType::Aaaa];

    /// The TYPE value on the wire.
    pub const fn code(self) -> u16 {
        match self {
            QType::Mx => 15,
            QType::A => 1,
            QType::Aaaa => 28,
        }
    }

    /// The type for a wire TYPE value, if it is one of ours.
    pub const fn from_code(code: u16) -> Option<QType> {
        match code {
            15 => Some(QType::Mx),
            1 => Some(QType::A),
            28 => Some(QType::Aaaa),
            _ => None,
        }
    }

    /// A dense index (0..3) for per-type tables.
    pub const fn index(self) -> usize {
        match self {
            QType::Mx => 0,
            QType::A => 1,
            QType::Aaaa => 2,
        }
    }

    fn record_type(self) -> RecordType {
        match self {
            QType::Mx => RecordType::MX,
            QType::A => RecordType::A,
            QType::Aaaa => RecordType::AAAA,
        }
    }
}

impl fmt::Display for QType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QType::Mx => "MX",
            QType::A => "A",
            QType::Aaaa => "AAAA",
        })
    }
}

/// The response code of an answer (RFC 1035 §4.1.1; extended bits from EDNS, RFC 6891 §6.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// 0: the answer (or NODATA when it has no records of the type asked).
    NoError,
    /// 3: the name does not exist (RFC 2308 §2.1).
    NxDomain,
    /// 2: the server could not answer.
    ServFail,
    /// 5: the server will not answer us.
    Refused,
    /// Anything else (FORMERR, NOTIMP, ...), with its value.
    Other(u16),
}

/// The question an answer is for (RFC 1035 §4.1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Canonical name (see the module doc).
    pub name: String,
    /// The raw QTYPE (see [`QType::from_code`]).
    pub qtype: u16,
}

/// The record data sluice understands; other types are skipped when decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RrData {
    /// `MX preference exchange` (RFC 1035 §3.3.9); an empty exchange is the root (null MX,
    /// RFC 7505).
    Mx {
        /// Lower is preferred.
        preference: u16,
        /// Canonical host name.
        exchange: String,
    },
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// `CNAME target` (RFC 1035 §3.3.1), canonical.
    Cname(String),
    /// `PTR name` (RFC 1035 §3.3.12): the name of an address, canonical.
    Ptr(String),
}

/// One resource record of class IN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name, canonical.
    pub name: String,
    /// Time to live, seconds.
    pub ttl: u32,
    /// The data.
    pub data: RrData,
}

/// What negative caching needs from the SOA of the authority section (RFC 2308 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Soa {
    /// The SOA record's own TTL, seconds.
    pub ttl: u32,
    /// The SOA MINIMUM field, seconds.
    pub minimum: u32,
}

impl Soa {
    /// The negative-caching TTL: the lesser of the SOA's TTL and its MINIMUM (RFC 2308 §5).
    pub fn negative_ttl(self) -> u32 {
        self.ttl.min(self.minimum)
    }
}

/// A decoded response, reduced to what delivery needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Message id (RFC 1035 §4.1.1).
    pub id: u16,
    /// Response code.
    pub rcode: Rcode,
    /// TC: the answer did not fit; ask again over TCP (RFC 7766 §5).
    pub truncated: bool,
    /// The question section's only entry; `None` when it did not have exactly one.
    pub question: Option<Question>,
    /// Answer section: MX, A, AAAA and CNAME records of class IN.
    pub answers: Vec<Record>,
    /// Additional section: the same types (A/AAAA of MX exchanges, usually).
    pub additionals: Vec<Record>,
    /// The first SOA of the authority section, for negative caching.
    pub soa: Option<Soa>,
}

/// Why bytes could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// A name that is not a valid domain name (syntax, label or total length).
    BadName(&'static str),
    /// The message could not be encoded.
    Encode,
    /// The bytes are not a well-formed DNS message.
    Decode,
    /// A well-formed message that is not a response to a standard query.
    NotResponse,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::BadName(why) => write!(f, "invalid domain name: {why}"),
            WireError::Encode => f.write_str("cannot encode DNS query"),
            WireError::Decode => f.write_str("malformed DNS message"),
            WireError::NotResponse => f.write_str("DNS message is not a query response"),
        }
    }
}

impl std::error::Error for WireError {}

/// Checks `name` and returns its canonical form (module doc): lower-case, no trailing dot,
/// Unicode names converted to A-labels (RFC 5890). Only letters, digits, `-`, `_` and `.` are
/// accepted in ASCII names (RFC 5321 §4.1.2 `Domain`, plus `_` seen in the wild).
pub fn canonical_name(name: &str) -> Result<String, WireError> {
    let n = parse_name(name)?;
    Ok(name_string(&n))
}

fn parse_name(name: &str) -> Result<Name, WireError> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(WireError::BadName("empty"));
    }
    let mut n = if trimmed.is_ascii() {
        if !trimmed.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
            return Err(WireError::BadName("character not allowed in a domain name"));
        }
        Name::from_ascii(trimmed).map_err(|_| WireError::BadName("bad label"))?
    } else {
        Name::from_utf8(trimmed).map_err(|_| WireError::BadName("not a valid internationalized name"))?
    };
    n.set_fqdn(true);
    if n.iter().any(|l| l.is_empty()) {
        return Err(WireError::BadName("empty label"));
    }
    if name_string(&n).len() > MAX_NAME_LEN {
        return Err(WireError::BadName("longer than 253 characters"));
    }
    Ok(n)
}

fn name_string(n: &Name) -> String {
    let mut s = n.to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s.make_ascii_lowercase();
    s
}

/// Encodes a standard query (RFC 1035 §4.1) for `name`/`qtype` with message id `id`, RD set
/// (we ask a recursive resolver) and an EDNS0 OPT record advertising [`EDNS_UDP_SIZE`].
pub fn encode_query(id: u16, name: &str, qtype: QType) -> Result<Vec<u8>, WireError> {
    let n = parse_name(name)?;
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(n, qtype.record_type()));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_UDP_SIZE);
    m.set_edns(edns);
    m.to_vec().map_err(|_| WireError::Encode)
}

/// The reverse-lookup name of an address, canonical: `4.3.2.1.in-addr.arpa` (RFC 1035
/// §3.5) or the 32 nibbles under `ip6.arpa` (RFC 3596 §2.5).
pub fn reverse_name(ip: IpAddr) -> String {
    name_string(&Name::from(ip))
}

/// Encodes a PTR query for `ip`'s reverse name (RFC 1035 §3.5), as [`encode_query`] does for
/// the other types: RD set, EDNS0 with [`EDNS_UDP_SIZE`].
pub fn encode_ptr_query(id: u16, ip: IpAddr) -> Result<Vec<u8>, WireError> {
    let mut n = Name::from(ip);
    n.set_fqdn(true);
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(n, RecordType::PTR));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_UDP_SIZE);
    m.set_edns(edns);
    m.to_vec().map_err(|_| WireError::Encode)
}

/// The QTYPE of a PTR question (RFC 1035 §3.2.2), for matching an answer to its query.
pub const PTR_CODE: u16 = 12;

/// Reads the message id without decoding the rest (the first two octets, RFC 1035 §4.1.1).
pub fn peek_id(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
}

/// Largest DNS message over TCP (the two-octet length prefix, RFC 1035 §4.2.2).
pub const MAX_TCP_MESSAGE: usize = 65_535;

/// A message framed for TCP: its length as two octets, then the message (RFC 1035 §4.2.2,
/// RFC 7766 §8). `None` when it is too long to frame.
pub fn frame_tcp(msg: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(msg.len()).ok()?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Some(out)
}

/// The first whole message in bytes read from a TCP connection (RFC 1035 §4.2.2): `None`
/// while its length prefix or part of it is still to come.
pub fn tcp_message(input: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*input.first()?, *input.get(1)?]));
    input.get(2..2 + len)
}

/// Decodes a response into an [`Answer`]. Records of other types or classes are skipped.
pub fn decode_answer(bytes: &[u8]) -> Result<Answer, WireError> {
    let m = Message::from_vec(bytes).map_err(|_| WireError::Decode)?;
    if m.metadata.message_type != MessageType::Response || m.metadata.op_code != OpCode::Query {
        return Err(WireError::NotResponse);
    }
    let rcode = match u16::from(m.metadata.response_code) {
        0 => Rcode::NoError,
        2 => Rcode::ServFail,
        3 => Rcode::NxDomain,
        5 => Rcode::Refused,
        other => Rcode::Other(other),
    };
    let question = match m.queries.as_slice() {
        [q] if q.query_class() == DNSClass::IN => {
            Some(Question { name: name_string(q.name()), qtype: u16::from(q.query_type()) })
        }
        _ => None,
    };
    let soa = m.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(Soa { ttl: r.ttl, minimum: soa.minimum }),
        _ => None,
    });
    Ok(Answer {
        id: m.metadata.id,
        rcode,
        truncated: m.metadata.truncation,
        question,
        answers: records(&m.answers),
        additionals: records(&m.additionals),
        soa,
    })
}

fn records(rrs: &[hickory_proto::rr::Record]) -> Vec<Record> {
    rrs.iter()
        .filter(|r| r.dns_class == DNSClass::IN)
        .filter_map(|r| {
            let data = match &r.data {
                RData::MX(mx) => RrData::Mx { preference: mx.preference, exchange: name_string(&mx.exchange) },
                RData::A(a) => RrData::A(a.0),
                RData::AAAA(a) => RrData::Aaaa(a.0),
                RData::CNAME(c) => RrData::Cname(name_string(&c.0)),
                RData::PTR(p) => RrData::Ptr(name_string(&p.0)),
                _ => return None,
            };
            Some(Record { name: name_string(&r.name), ttl: r.ttl, data })
        })
        .collect()
}

/// Test support: an authoritative-style responder that answers the queries the resolver
/// sends, built with hickory so that the codec is checked against an independent encoder.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::{HashMap, HashSet};
    use std::net::IpAddr;

    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    use super::QType;

    fn fqdn(s: &str) -> Name {
        let mut n = if s.is_empty() { Name::root() } else { Name::from_ascii(s).unwrap() };
        n.set_fqdn(true);
        n
    }

    /// Records keyed by canonical name.
    #[derive(Debug, Clone)]
    pub(crate) struct Zone {
        pub ttl: u32,
        pub soa_ttl: u32,
        pub soa_minimum: u32,
        pub mx: HashMap<String, Vec<(u16, String)>>,
        pub addrs: HashMap<String, Vec<IpAddr>>,
        pub cname: HashMap<String, String>,
        /// PTR records by reverse name.
        pub ptr: HashMap<String, Vec<String>>,
        /// Names that exist without records (NODATA for everything).
        pub exists: HashSet<String>,
        pub servfail: HashSet<String>,
        pub refused: HashSet<String>,
        /// Put the exchanges' addresses in the additional section of MX answers.
        pub glue: bool,
        /// Address records added to the additional section of every MX answer.
        pub extra_additional: Vec<(String, IpAddr)>,
        /// Recursive-resolver style: answer for the CNAME target too.
        pub chase_cname: bool,
        /// UDP answers longer than this are truncated (TC, empty sections).
        pub udp_limit: usize,
    }

    impl Default for Zone {
        fn default() -> Zone {
            Zone {
                ttl: 300,
                soa_ttl: 3600,
                soa_minimum: 60,
                mx: HashMap::new(),
                addrs: HashMap::new(),
                cname: HashMap::new(),
                ptr: HashMap::new(),
                exists: HashSet::new(),
                servfail: HashSet::new(),
                refused: HashSet::new(),
                glue: false,
                extra_additional: Vec::new(),
                chase_cname: true,
                udp_limit: 1232,
            }
        }
    }

    impl Zone {
        pub fn mx(mut self, domain: &str, pref: u16, host: &str) -> Zone {
            self.mx.entry(domain.into()).or_default().push((pref, host.into()));
            self
        }
        pub fn addr(mut self, host: &str, ip: &str) -> Zone {
            self.addrs.entry(host.into()).or_default().push(ip.parse().unwrap());
            self
        }

        fn name_exists(&self, n: &str) -> bool {
            self.mx.contains_key(n)
                || self.addrs.contains_key(n)
                || self.cname.contains_key(n)
                || self.exists.contains(n)
        }

        /// Answers query bytes as the test server would; `tcp` lifts the size limit.
        pub fn respond(&self, query: &[u8], tcp: bool) -> Vec<u8> {
            let req = Message::from_vec(query).unwrap();
            assert_eq!(req.metadata.message_type, MessageType::Query);
            assert!(req.metadata.recursion_desired);
            assert_eq!(req.edns.as_ref().map(|e| e.max_payload()), Some(super::EDNS_UDP_SIZE));
            let q = req.queries[0].clone();
            let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
            resp.metadata.recursion_desired = true;
            resp.metadata.recursion_available = true;
            resp.add_query(q.clone());
            let mut name = super::name_string(q.name());
            if u16::from(q.query_type()) == super::PTR_CODE {
                for target in self.ptr.get(&name).into_iter().flatten() {
                    resp.add_answer(Record::from_rdata(fqdn(&name), self.ttl, RData::PTR(PTR(fqdn(target)))));
                }
                if resp.answers.is_empty() {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                }
                return self.sized(resp, tcp);
            }
            let qtype = QType::from_code(u16::from(q.query_type())).unwrap();
            if self.servfail.contains(&name) {
                resp.metadata.response_code = ResponseCode::ServFail;
                return resp.to_vec().unwrap();
            }
            if self.refused.contains(&name) {
                resp.metadata.response_code = ResponseCode::Refused;
                return resp.to_vec().unwrap();
            }
            for _ in 0..8 {
                let Some(target) = self.cname.get(&name) else { break };
                resp.add_answer(Record::from_rdata(fqdn(&name), self.ttl, RData::CNAME(CNAME(fqdn(target)))));
                name = target.clone();
                if !self.chase_cname {
                    return resp.to_vec().unwrap();
                }
            }
            match qtype {
                QType::Mx => {
                    for (pref, host) in self.mx.get(&name).into_iter().flatten() {
                        let mx = MX::new(*pref, fqdn(host));
                        resp.add_answer(Record::from_rdata(fqdn(&name), self.ttl, RData::MX(mx)));
                        if self.glue {
                            for ip in self.addrs.get(&host.to_ascii_lowercase()).into_iter().flatten() {
                                resp.add_additional(Record::from_rdata(fqdn(host), self.ttl, rdata(*ip)));
                            }
                        }
                    }
                    for (host, ip) in &self.extra_additional {
                        resp.add_additional(Record::from_rdata(fqdn(host), self.ttl, rdata(*ip)));
                    }
                }
                QType::A | QType::Aaaa => {
                    for ip in self.addrs.get(&name).into_iter().flatten() {
                        if ip.is_ipv4() == (qtype == QType::A) {
                            resp.add_answer(Record::from_rdata(fqdn(&name), self.ttl, rdata(*ip)));
                        }
                    }
                }
            }
            if resp.answers.iter().all(|r| r.record_type() == RecordType::CNAME) {
                if !self.name_exists(&name) {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                }
                let soa = SOA::new(fqdn("ns.test"), fqdn("hostmaster.test"), 1, 3600, 600, 86400, self.soa_minimum);
                resp.add_authority(Record::from_rdata(fqdn("test"), self.soa_ttl, RData::SOA(soa)));
            }
            self.sized(resp, tcp)
        }

        /// The response's bytes; over UDP, truncated (TC, empty sections) past `udp_limit`.
        fn sized(&self, mut resp: Message, tcp: bool) -> Vec<u8> {
            let bytes = resp.to_vec().unwrap();
            if !tcp && bytes.len() > self.udp_limit {
                resp.answers.clear();
                resp.additionals.clear();
                resp.authorities.clear();
                resp.metadata.truncation = true;
                return resp.to_vec().unwrap();
            }
            bytes
        }
    }

    fn rdata(ip: IpAddr) -> RData {
        match ip {
            IpAddr::V4(a) => RData::A(A(a)),
            IpAddr::V6(a) => RData::AAAA(AAAA(a)),
        }
    }

    /// (id, canonical name, type) of query bytes.
    pub(crate) fn parse_query(query: &[u8]) -> (u16, String, QType) {
        let m = Message::from_vec(query).unwrap();
        let q = &m.queries[0];
        (m.metadata.id, super::name_string(q.name()), QType::from_code(u16::from(q.query_type())).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{parse_query, Zone};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canonical_names() {
        let table: &[(&str, Result<&str, ()>)] = &[
            ("Example.COM", Ok("example.com")),
            ("example.com.", Ok("example.com")),
            ("a-b_c.example", Ok("a-b_c.example")),
            ("bücher.example", Ok("xn--bcher-kva.example")),
            ("", Err(())),
            (".", Err(())),
            ("a..b", Err(())),
            ("a b.example", Err(())),
            ("a\\.b", Err(())),
            ("[192.0.2.1]", Err(())),
            (&"a".repeat(64), Err(())),
        ];
        for (input, want) in table {
            let got = canonical_name(input).map_err(|_| ());
            assert_eq!(got.as_deref(), want.as_deref(), "{input:?}");
        }
        let long = ["abcdefghi"; 26].join("."); // 259 characters
        assert!(canonical_name(&long).is_err());
    }

    #[test]
    fn query_has_rd_edns_and_question() {
        let bytes = encode_query(0xbeef, "Example.com", QType::Mx).unwrap();
        assert_eq!(peek_id(&bytes), Some(0xbeef));
        assert_eq!(parse_query(&bytes), (0xbeef, "example.com".into(), QType::Mx));
        // Header: RD is bit 0 of the third octet; one question, one additional (OPT).
        assert_eq!(bytes[2] & 0x01, 1);
        assert_eq!(&bytes[4..6], &[0, 1]);
        assert_eq!(&bytes[10..12], &[0, 1]);
        // A query is not an answer.
        assert_eq!(decode_answer(&bytes), Err(WireError::NotResponse));
        assert_eq!(encode_query(1, "a b", QType::A), Err(WireError::BadName("character not allowed in a domain name")));
    }

    #[test]
    fn decodes_mx_answer_with_glue() {
        let mut zone =
            Zone::default().mx("example.com", 20, "mx2.example.com").mx("example.com", 10, "MX1.example.com");
        zone = zone.addr("mx1.example.com", "192.0.2.1").addr("mx1.example.com", "2001:db8::1");
        zone.glue = true;
        let q = encode_query(7, "example.com", QType::Mx).unwrap();
        let a = decode_answer(&zone.respond(&q, false)).unwrap();
        assert_eq!(a.id, 7);
        assert_eq!(a.rcode, Rcode::NoError);
        assert!(!a.truncated);
        assert_eq!(a.question, Some(Question { name: "example.com".into(), qtype: 15 }));
        assert_eq!(
            a.answers,
            vec![
                Record {
                    name: "example.com".into(),
                    ttl: 300,
                    data: RrData::Mx { preference: 20, exchange: "mx2.example.com".into() }
                },
                Record {
                    name: "example.com".into(),
                    ttl: 300,
                    data: RrData::Mx { preference: 10, exchange: "mx1.example.com".into() }
                },
            ]
        );
        assert_eq!(a.additionals.len(), 2);
        assert_eq!(a.additionals[0].data, RrData::A("192.0.2.1".parse().unwrap()));
        assert_eq!(a.additionals[1].data, RrData::Aaaa("2001:db8::1".parse().unwrap()));
        assert_eq!(a.soa, None);
    }

    #[test]
    fn decodes_negative_answers_and_null_mx() {
        let mut zone = Zone::default().mx("null.example", 0, "");
        zone.exists.insert("nodata.example".into());
        zone.cname.insert("alias.example".into(), "real.example".into());
        zone.servfail.insert("broken.example".into());
        zone.refused.insert("closed.example".into());
        let ask =
            |name: &str, t: QType| decode_answer(&zone.respond(&encode_query(1, name, t).unwrap(), false)).unwrap();

        let a = ask("nx.example", QType::Mx);
        assert_eq!(a.rcode, Rcode::NxDomain);
        assert_eq!(a.soa, Some(Soa { ttl: 3600, minimum: 60 }));
        assert_eq!(a.soa.unwrap().negative_ttl(), 60);
        let a = ask("nodata.example", QType::Mx);
        assert_eq!((a.rcode, a.answers.len()), (Rcode::NoError, 0));
        assert!(a.soa.is_some());
        let a = ask("null.example", QType::Mx);
        assert_eq!(a.answers[0].data, RrData::Mx { preference: 0, exchange: String::new() });
        let a = ask("alias.example", QType::A);
        assert_eq!(a.answers[0].data, RrData::Cname("real.example".into()));
        assert_eq!(a.rcode, Rcode::NxDomain);
        assert_eq!(ask("broken.example", QType::A).rcode, Rcode::ServFail);
        assert_eq!(ask("closed.example", QType::A).rcode, Rcode::Refused);
    }

    #[test]
    fn ptr_queries_use_the_reverse_names_and_answers_decode() {
        assert_eq!(reverse_name("192.0.2.10".parse().unwrap()), "10.2.0.192.in-addr.arpa");
        let v6 = reverse_name("2001:db8::1".parse().unwrap());
        assert!(v6.starts_with("1.0.0.0.") && v6.ends_with(".8.b.d.0.1.0.0.2.ip6.arpa"), "{v6}");
        assert_eq!(v6.split('.').count(), 34);
        let mut zone = Zone::default();
        zone.ptr.insert("10.2.0.192.in-addr.arpa".into(), vec!["Out1.Example.com".into()]);
        let q = encode_ptr_query(0x77, "192.0.2.10".parse().unwrap()).unwrap();
        assert_eq!(peek_id(&q), Some(0x77));
        let a = decode_answer(&zone.respond(&q, false)).unwrap();
        assert_eq!(a.question, Some(Question { name: "10.2.0.192.in-addr.arpa".into(), qtype: PTR_CODE }));
        assert_eq!(a.answers[0].data, RrData::Ptr("out1.example.com".into()));
        let q = encode_ptr_query(1, "192.0.2.11".parse().unwrap()).unwrap();
        assert_eq!(decode_answer(&zone.respond(&q, false)).unwrap().rcode, Rcode::NxDomain);
    }

    #[test]
    fn tcp_framing_round_trips_and_waits_for_whole_messages() {
        let framed = frame_tcp(b"abc").unwrap();
        assert_eq!(framed, b"\x00\x03abc");
        assert_eq!(tcp_message(&framed), Some(&b"abc"[..]));
        for cut in 0..framed.len() {
            assert_eq!(tcp_message(&framed[..cut]), None, "{cut} octets");
        }
        // Whatever follows the first message is left for the next call.
        assert_eq!(tcp_message(b"\x00\x01xyz"), Some(&b"x"[..]));
        assert_eq!(frame_tcp(&vec![0; MAX_TCP_MESSAGE + 1]), None);
    }

    #[test]
    fn truncated_answers_carry_tc() {
        let mut zone = Zone::default();
        for i in 0..60 {
            zone = zone.mx("big.example", i, &format!("a-rather-long-mail-exchanger-name-{i}.big.example"));
        }
        let q = encode_query(9, "big.example", QType::Mx).unwrap();
        let udp = decode_answer(&zone.respond(&q, false)).unwrap();
        assert!(udp.truncated);
        assert!(udp.answers.is_empty());
        let tcp = decode_answer(&zone.respond(&q, true)).unwrap();
        assert!(!tcp.truncated);
        assert_eq!(tcp.answers.len(), 60);
    }

    #[test]
    fn garbage_is_an_error() {
        for bytes in [&b""[..], b"\x00", b"\x12\x34\x81\x80", &[0xff; 12], &[0x00; 64]] {
            assert!(decode_answer(bytes).is_err(), "{bytes:?}");
        }
        assert_eq!(peek_id(b"\x12"), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_answer(&bytes);
        }

        #[test]
        fn mutated_answers_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut zone = Zone::default().mx("example.com", 10, "mx.example.com").addr("mx.example.com", "192.0.2.1");
            zone.glue = true;
            let mut bytes = zone.respond(&encode_query(3, "example.com", QType::Mx).unwrap(), false);
            for (i, v) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= v;
            }
            let _ = decode_answer(&bytes);
            let _ = decode_answer(&bytes[..cut.index(bytes.len())]);
        }

        #[test]
        fn query_round_trips(id in any::<u16>(), labels in proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", 1..5), t in 0usize..3) {
            let name = labels.join(".");
            let qtype = QType::ALL[t];
            let bytes = encode_query(id, &name, qtype).unwrap();
            prop_assert_eq!(parse_query(&bytes), (id, name, qtype));
        }
    }
}
