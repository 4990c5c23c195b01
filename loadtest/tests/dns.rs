//! `sluice-load dns` answers `dig` (Debian dnsutils: required on CI, skipped locally when
//! missing) and a hickory-proto client, over UDP and TCP.

mod common;

use common::{have, run_bounded, Daemon};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

fn dns() -> Daemon {
    Daemon::start(&[
        "dns",
        "--listen",
        "127.0.0.1:0",
        "--zone",
        "example.test=127.0.0.2",
        "--mx",
        "multi.test=20:mx2.multi.test",
        "--mx",
        "multi.test=10:mx1.multi.test",
        "--a",
        "mx1.multi.test=127.0.0.3",
        "--a",
        "mx1.multi.test=::1",
        "--nullmx",
        "null.test",
        "--servfail",
        "broken.test",
        "--ttl",
        "42",
        "--duration",
        "60s",
    ])
}

fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let out = run_bounded(
        Command::new("dig")
            .args([&format!("@{}", addr.ip()), "-p", &addr.port().to_string(), "+time=2", "+tries=1"])
            .args(args),
        Duration::from_secs(15),
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn dig_sees_the_zone() {
    if !have("dig") {
        return;
    }
    let d = dns();
    let a = d.addr;
    assert_eq!(dig(a, &["+short", "example.test", "MX"]).trim(), "10 mx.example.test.");
    assert_eq!(dig(a, &["+short", "mx.example.test", "A"]).trim(), "127.0.0.2");
    let mut mx: Vec<String> = dig(a, &["+short", "multi.test", "MX"]).lines().map(str::to_string).collect();
    mx.sort();
    assert_eq!(mx, ["10 mx1.multi.test.", "20 mx2.multi.test."]);
    assert_eq!(dig(a, &["+short", "mx1.multi.test", "AAAA"]).trim(), "::1");
    assert_eq!(dig(a, &["+short", "null.test", "MX"]).trim(), "0 .");
    let full = dig(a, &["example.test", "MX"]);
    assert!(full.contains("status: NOERROR") && full.contains(" aa") && full.contains("42\tIN\tMX"), "{full}");
    let nx = dig(a, &["nothing.test", "A"]);
    assert!(nx.contains("status: NXDOMAIN") && nx.contains("SOA"), "{nx}");
    let nodata = dig(a, &["mx.example.test", "AAAA"]);
    assert!(nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"), "{nodata}");
    assert!(dig(a, &["x.broken.test", "MX"]).contains("status: SERVFAIL"));
    let tcp = dig(a, &["+tcp", "+short", "mx1.multi.test", "A"]);
    assert_eq!(tcp.trim(), "127.0.0.3");
    drop(d);
}

fn query(name: &str, t: RecordType) -> Message {
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    q.metadata.recursion_desired = true;
    q
}

#[test]
fn hickory_client_over_udp_and_tcp() {
    let d = dns();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let q = query("example.test.", RecordType::MX);
    udp.send_to(&q.to_vec().unwrap(), d.addr).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id);
    assert!(r.metadata.authoritative);
    assert_eq!(r.answers.len(), 1);
    match &r.answers[0].data {
        RData::MX(mx) => assert_eq!((mx.preference, mx.exchange.to_ascii()), (10, "mx.example.test.".to_string())),
        other => panic!("{other:?}"),
    }
    // TCP: two pipelined, length-prefixed queries on one connection.
    let mut tcp = TcpStream::connect(d.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    for (name, t) in [("nothing.test.", RecordType::A), ("mx1.multi.test.", RecordType::A)] {
        let m = query(name, t).to_vec().unwrap();
        out.extend_from_slice(&(m.len() as u16).to_be_bytes());
        out.extend_from_slice(&m);
    }
    tcp.write_all(&out).unwrap();
    let mut codes = Vec::new();
    for _ in 0..2 {
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).unwrap();
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        tcp.read_exact(&mut m).unwrap();
        let r = Message::from_vec(&m).unwrap();
        codes.push((r.metadata.response_code, r.answers.len()));
    }
    assert_eq!(codes, [(ResponseCode::NXDomain, 0), (ResponseCode::NoError, 1)]);
    drop(d);
}
