//! SMTP smuggling: only CRLF.CRLF ends data; bare CR/LF in DATA is refused, never turned into a
//! second message; bytes after DATA are data, not commands.

use super::support::*;

fn open(relay: &Relay) -> Client {
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    c.expect_ok("MAIL FROM:<a@b.test>", "250");
    c.expect_ok("RCPT TO:<x@y.test>", "250");
    c.expect_ok("DATA", "354");
    c
}

#[test]
fn bare_line_endings_never_end_data_or_smuggle() {
    let mut relay = Relay::start(&[]);
    let _dir = relay.take_dir();
    let variants: [&[u8]; 5] = [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\n", b"\r\n.\r"];
    for v in variants {
        let mut c = open(&relay);
        let mut data = b"Subject: evil\r\n\r\nhello".to_vec();
        data.extend_from_slice(v);
        data.extend_from_slice(b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nNOOP\r\n");
        c.send(&data);
        let r = c.reply();
        assert!(r.starts_with("550 5.6.0"), "variant {v:?}: {r}");
        // The NOOP after the real end is parsed as a command, once.
        c.expect("250 2.0.0 Ok");
        c.expect_ok("QUIT", "221");
    }
    let spool = relay.spool.clone();
    drop(relay);
    assert!(spool_messages(&spool).is_empty(), "nothing may be stored");
}

#[test]
fn pipelined_commands_after_data_are_message_text() {
    let mut relay = Relay::start(&[]);
    let _dir = relay.take_dir();
    let mut c = relay.client();
    c.expect("220");
    // A client that does not wait for 354: everything after DATA is the message.
    c.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nSubject: p\r\n\r\nRSET\r\nQUIT\r\n.\r\nNOOP\r\n");
    c.expect("250-");
    c.expect("250");
    c.expect("250");
    c.expect("354");
    let ok = c.expect("250 2.0.0 Ok: queued as");
    c.expect("250 2.0.0 Ok");
    let spool = relay.spool.clone();
    drop(c);
    drop(relay);
    let msgs = spool_messages(&spool);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, queue_id(&ok));
    assert!(msgs[0].1.ends_with(b"Subject: p\r\n\r\nRSET\r\nQUIT\r\n"));
}

#[test]
fn byte_at_a_time_client_gets_same_result() {
    let relay = Relay::start(&[]);
    let mut c = relay.client();
    c.expect("220");
    c.stream.set_nodelay(true).unwrap();
    let script = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n";
    for b in script {
        c.send(&[*b]);
    }
    c.expect("250-");
    c.expect("250");
    c.expect("250");
    c.expect("354");
    for b in b"..dot\r\nline\r\n.\r\n" {
        c.send(&[*b]);
    }
    c.expect("250 2.0.0 Ok: queued as");
}
