//! Writes the seed corpora under `tests/fuzz/corpus/<target>/` (run from `tests/fuzz`:
//! `cargo run --example make_seeds`). The seeds are committed; run this again only when a
//! format changes. Spool seeds are real segments written by `Spool`, so they follow whatever
//! the encoder does today.

use std::fs;
use std::path::Path;

use sluice::message::{Envelope, QueueId};
use sluice::spool::format::SEGMENT_HEADER_LEN;
use sluice::spool::{Outcome, RcptStatus, Spool, SpoolOptions};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    inbound(&root.join("inbound_session"));
    outbound(&root.join("outbound_replies"));
    dns(&root.join("dns_answers"));
    spool(&root.join("spool_recovery"));
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

/// Raw mode: mode byte (even; bit 1 STARTTLS, bit 2 AUTH + implicit TLS, bit 3 relay), eight
/// cut bytes, then the client's stream.
fn inbound(dir: &Path) {
    let cuts = [3u8, 40, 41, 90, 128, 170, 200, 250];
    let raw = |mode: u8, stream: &[u8]| [&[mode][..], &cuts, stream].concat();
    write(
        dir,
        "transaction",
        &raw(
            8,
            b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=20 BODY=8BITMIME\r\nRCPT TO:<x@y.example> NOTIFY=SUCCESS,FAILURE \
ORCPT=rfc822;x+40y.example\r\nDATA\r\nSubject: hi\r\n\r\n..body\r\n.\r\nRSET\r\nQUIT\r\n",
        ),
    );
    write(
        dir,
        "bdat_and_smuggling",
        &raw(
            8,
            b"EHLO c\r\nMAIL FROM:<a@b> BODY=BINARYMIME\r\nRCPT TO:<x@y>\r\nBDAT 5\r\nab\r\ncBDAT 3 LAST\r\nxyz\
MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nx\n.\r\nMAIL FROM:<evil@x>\r\n.\r\nNOOP\r\nVRFY x\r\nHELP\r\n",
        ),
    );
    // AUTH PLAIN "\0u\0p", then LOGIN "user"/"pass", inside implicit TLS.
    write(
        dir,
        "auth",
        &raw(14, b"EHLO c\r\nAUTH PLAIN AHUAcA==\r\nAUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\nAUTH PLAIN\r\n*\r\nQUIT\r\n"),
    );
    write(dir, "starttls", &raw(2, b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x>\r\n"));
    // Structured mode (odd first byte): arbitrary bytes read as a script.
    write(dir, "script", &(0..=255u8).map(|b| b.wrapping_mul(37) | 1).collect::<Vec<u8>>());
}

/// Even: replies for `parse_reply`; odd: a script for `ClientSession`.
fn outbound(dir: &Path) {
    write(
        dir,
        "replies",
        b"\x00220 mx.test ESMTP\r\n250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-CHUNKING\r\n250-AUTH=PLAIN LOGIN\r\n\
250 ENHANCEDSTATUSCODES\r\n250 2.1.0 ok\r\n550-5.1.1 no\r\n550-5.1.1 such\r\n550 user\r\n354 go\n421 4.7.0 bye\r\n",
    );
    write(dir, "malformed", b"\x00250-a\r\n251 b\r\n99 x\r\n250");
    write(dir, "script", &(0..=255u8).map(|b| b.wrapping_mul(91).wrapping_add(1) | 1).collect::<Vec<u8>>());
}

fn name(out: &mut Vec<u8>, dotted: &str) {
    for label in dotted.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// One resource record: owner (raw bytes: labels or a pointer), type, class IN, ttl, rdata.
fn rr(out: &mut Vec<u8>, owner: &[u8], rtype: u16, rdata: &[u8]) {
    out.extend_from_slice(owner);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&300u32.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
}

/// A spliced response for the resolver mode: `control | len | flags | counts | records`.
fn spliced(control: u8, flags: u16, counts: [u16; 3], records: &[u8]) -> Vec<u8> {
    let mut body = flags.to_be_bytes().to_vec();
    for c in counts {
        body.extend_from_slice(&c.to_be_bytes());
    }
    body.extend_from_slice(records);
    let mut out = vec![control];
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn dns(dir: &Path) {
    // The question name is at offset 12 of every spliced response.
    const Q: &[u8] = &[0xc0, 0x0c];
    let mut mx = 10u16.to_be_bytes().to_vec();
    name(&mut mx, "mx1.example.com");
    let mut mx_host = Vec::new();
    name(&mut mx_host, "mx1.example.com");
    let mut records = Vec::new();
    rr(&mut records, Q, 15, &mx);
    rr(&mut records, &mx_host, 1, &[192, 0, 2, 10]);
    let mut a = Vec::new();
    rr(&mut a, Q, 1, &[192, 0, 2, 11]);
    let mut aaaa = Vec::new();
    rr(&mut aaaa, Q, 28, &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    let mut cname_target = Vec::new();
    name(&mut cname_target, "alias.example.net");
    let mut cname = Vec::new();
    rr(&mut cname, Q, 5, &cname_target);
    let null_mx = {
        let mut r = Vec::new();
        rr(&mut r, Q, 15, &[0, 0, 0]);
        r
    };
    let resolver_seed = [
        vec![1u8],
        spliced(0x01, 0x8180, [1, 0, 1], &records),
        spliced(0x01, 0x8180, [1, 0, 0], &a),
        spliced(0x01, 0x8180, [1, 0, 0], &aaaa),
        spliced(0x03, 0x8180, [1, 0, 0], &cname),
        spliced(0x21, 0x8183, [0, 0, 0], &[]),
        spliced(0x01, 0x8380, [0, 0, 0], &[]),
        spliced(0x11, 0x8182, [0, 0, 0], &[]),
    ]
    .concat();
    write(dir, "resolver", &resolver_seed);
    write(dir, "null_mx", &[vec![3u8], spliced(0x01, 0x8180, [1, 0, 0], &null_mx)].concat());
    // Decode mode: one whole response to "example.com MX".
    let mut msg = vec![0u8, 0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 1];
    name(&mut msg, "example.com");
    msg.extend_from_slice(&[0, 15, 0, 1]);
    msg.extend_from_slice(&records);
    write(dir, "message", &msg);
}

fn envelope(rcpts: &[&str]) -> Envelope {
    let mut e = Envelope::default();
    e.sender = b"sender@example.org".to_vec();
    e.envid = b"ENV1".to_vec();
    e.client_ip = "192.0.2.7".parse().unwrap();
    e.helo = b"client.example.org".to_vec();
    for r in rcpts {
        e.push_rcpt(r.as_bytes(), b"rfc822;x+40y", 6);
    }
    e
}

/// Segment files of a spool in which `fill` appended and committed, concatenated in sequence
/// order with trailing zeros (preallocated space) cut at an 8-byte boundary.
fn segments(segment_size: u64, fill: impl FnOnce(&mut Spool)) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("sluice-make-seeds-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let (mut spool, _) = Spool::open(SpoolOptions { dir: dir.clone(), fsync: false, segment_size, min_free_space: 0, spares: false }).unwrap();
    fill(&mut spool);
    spool.commit().unwrap();
    drop(spool);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let mut bytes = fs::read(dir.join(n)).unwrap();
        let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        bytes.truncate(used.max(SEGMENT_HEADER_LEN).next_multiple_of(8));
        out.extend_from_slice(&bytes);
    }
    fs::remove_dir_all(&dir).unwrap();
    out
}

fn outcome(status: RcptStatus, reply: &[u8]) -> Outcome<'_> {
    Outcome {
        status,
        attempts: 1,
        next_attempt_ms: 1_700_000_060_000,
        at_ms: 1_700_000_000_000,
        reply,
        remote: b"mx[192.0.2.1]",
        bounce: None,
    }
}

fn spool(dir: &Path) {
    let basic = segments(64 * 1024, |s| {
        s.append_message(
            QueueId(1),
            1_700_000_000_000,
            &envelope(&["a@x.test", "b@y.test"]),
            b"Subject: 1\r\n\r\nhi\r\n",
        )
        .unwrap();
        s.append_message(QueueId(2), 1_700_000_000_001, &envelope(&["c@x.test"]), b"Subject: 2\r\n\r\nyo\r\n").unwrap();
        s.append_outcome(QueueId(1), 0, &outcome(RcptStatus::Delivered, b"250 2.0.0 Ok")).unwrap();
        s.append_outcome(QueueId(1), 1, &outcome(RcptStatus::Deferred, b"451 4.3.0 later")).unwrap();
        s.append_outcome(QueueId(2), 0, &outcome(RcptStatus::Failed, b"550 5.1.1 no")).unwrap();
    });
    write(dir, "basic", &basic);
    // Torn: the last record cut in the middle.
    write(dir, "torn_tail", &basic[..basic.len() - 20]);
    // A message whose body is well-formed records (a segment without its header).
    let embedded = segments(64 * 1024, |s| {
        let body = [b"Subject: records\r\n\r\n".as_slice(), &basic[SEGMENT_HEADER_LEN..]].concat();
        s.append_message(QueueId(3), 1_700_000_000_002, &envelope(&["d@x.test"]), &body).unwrap();
    });
    write(dir, "embedded_records", &embedded);
    // Small segments: messages roll over, outcomes land in later segments than their message.
    let rolled = segments(512, |s| {
        for i in 0..4u64 {
            let body = format!("Subject: {i}\r\n\r\n{}\r\n", "x".repeat(150));
            s.append_message(
                QueueId(10 + i),
                1_700_000_000_000 + i,
                &envelope(&["e@x.test", "f@y.test"]),
                body.as_bytes(),
            )
            .unwrap();
        }
        for i in 0..4u64 {
            s.append_outcome(QueueId(10 + i), (i % 2) as u32, &outcome(RcptStatus::Delivered, b"250 ok")).unwrap();
        }
    });
    write(dir, "rolled_segments", &rolled);
}
