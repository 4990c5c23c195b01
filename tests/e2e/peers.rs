//! Interoperability with third-party SMTP clients: Python smtplib, swaks, Postfix smtp-source.

use super::support::*;
use std::process::Command;

fn stats_messages(relay: &Relay) -> u64 {
    let (code, out, err) = queue_cmd(&relay.spool, &["stats", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = out.split("\"messages\":").nth(1).unwrap();
    v.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn python_smtplib() {
    if !require("python3") {
        return;
    }
    let relay = Relay::start(&[]);
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
host, port = sys.argv[1], int(sys.argv[2])
m = EmailMessage()
m["From"] = "sender@example.test"
m["To"] = "rcpt@example.test"
m["Subject"] = "smtplib"
m.set_content(".leading dot\nsecond line\n")
with smtplib.SMTP(host, port, local_hostname="py.test") as s:
    code, caps = s.ehlo()
    assert code == 250 and s.has_extn("pipelining") and s.has_extn("chunking"), caps
    refused = s.send_message(m, mail_options=["BODY=8BITMIME"], rcpt_options=["NOTIFY=FAILURE"])
    assert refused == {}, refused
    # UTF-8 addresses with SMTPUTF8.
    s.sendmail("ü@example.test", ["ö@example.test"], "Subject: utf8\r\n\r\nhi\r\n".encode(), mail_options=["SMTPUTF8"])
    try:
        s.sendmail("a@example.test", ["b@example.test"], b"x" * 3000, mail_options=["SIZE=999999999999"])
        sys.exit("oversize accepted")
    except smtplib.SMTPSenderRefused as e:
        assert e.smtp_code == 552, e
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(relay.addr.ip().to_string())
        .arg(relay.addr.port().to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(stats_messages(&relay), 2);
}

#[test]
fn swaks_with_pipelining() {
    if !require("swaks") {
        return;
    }
    let relay = Relay::start(&[]);
    let server = relay.addr.to_string();
    for extra in [&[][..], &["--pipeline"][..]] {
        let out = Command::new("swaks")
            .args([
                "--server",
                &server,
                "--from",
                "a@example.test",
                "--to",
                "b@example.test,c@example.test",
                "--helo",
                "swaks.test",
            ])
            .args(["--body", "line one\n.line with dot\n"])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    }
    assert_eq!(stats_messages(&relay), 2);
}

#[test]
fn postfix_smtp_source() {
    if !require("smtp-source") {
        return;
    }
    let relay = Relay::start(&["--fsync", "never"]);
    let out = Command::new("smtp-source")
        .args(["-s", "5", "-m", "200", "-l", "1024", "-d", "-f", "src@example.test", "-t", "dst@example.test"])
        .arg(relay.addr.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stats_messages(&relay), 200);
}
