//! The `sluice` binary: dispatches `serve`, `passwd`, `queue` and `dkim-keygen`. The only
//! place that exits the process.

use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;

use clap::Parser;
use sluice::admin;
use sluice::cli::{Cli, Cmd, KeygenArgs, QueueAction, QueueArgs};
use sluice::config::Config;
use sluice::reactor::{RunError, Server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => {
            let cfg = match Config::from_args(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    return ExitCode::from(2);
                }
            };
            let server = match Server::bind(cfg) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    return ExitCode::from(1);
                }
            };
            match server.run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ RunError::Poll(_))
                | Err(e @ RunError::Spool(_))
                | Err(e @ RunError::Listen(..))
                | Err(e @ RunError::Control(..))
                | Err(e @ RunError::Source(..))
                | Err(e @ RunError::Fcrdns(..)) => {
                    eprintln!("sluice: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Passwd { user } => passwd(&user),
        Cmd::DkimKeygen(args) => dkim_keygen(&args),
        Cmd::Queue(args) => match sluice::admin::run(&queue_query(&args), &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice queue: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// The clap flags of `sluice queue` as `admin`'s own request type.
fn queue_query(a: &QueueArgs) -> admin::Query {
    use sluice::cli::SummaryBy;
    use sluice::control::{BounceTarget, GroupBy, Request};
    let scope = |s: &sluice::cli::ScopeArgs| match (&s.domain, &s.provider, &s.site) {
        (Some(d), _, _) => format!("domain:{d}"),
        (None, Some(p), _) => format!("provider:{p}"),
        (None, None, Some(n)) => format!("site:{n}"),
        // clap requires one of the three.
        (None, None, None) => String::new(),
    };
    let action = match &a.action {
        QueueAction::List => admin::Action::List,
        QueueAction::Stats => admin::Action::Stats,
        QueueAction::Flush => admin::Action::Flush,
        QueueAction::Suspend { scope: s, duration, reason } => admin::Action::Control(Request::Suspend {
            scope: scope(s),
            for_ms: duration.as_millis() as u64,
            reason: reason.clone(),
        }),
        QueueAction::Resume { scope: s } => admin::Action::Control(Request::Resume { scope: scope(s) }),
        QueueAction::Suspensions => admin::Action::Control(Request::Suspensions),
        QueueAction::Bounce { target, reason } => {
            let target = match (&target.id, &target.domain) {
                (Some(id), _) => BounceTarget::Id(id.clone()),
                (None, d) => BounceTarget::Domain(d.clone().unwrap_or_default()),
            };
            admin::Action::Control(Request::Bounce { target, reason: reason.clone() })
        }
        QueueAction::Summary { by } => {
            let by = if *by == SummaryBy::Site { GroupBy::Site } else { GroupBy::Domain };
            admin::Action::Control(Request::Summary { by })
        }
    };
    admin::Query { spool: a.spool.clone(), json: a.json, action }
}

/// `sluice passwd USER`: reads one password line on stdin and prints `USER:PHC` for
/// `--auth-file`. Exit 2 for a user name the file cannot hold, 1 for any other failure.
fn passwd(user: &str) -> ExitCode {
    // The auth file splits at the first ':', trims lines and skips those starting with '#'.
    if user.is_empty() || user.contains(':') || user.starts_with('#') || user.chars().any(char::is_whitespace) {
        eprintln!(
            "sluice passwd: user name {user:?} must be non-empty, without ':' or whitespace, not starting with '#'"
        );
        return ExitCode::from(2);
    }
    let mut line = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_until(b'\n', &mut line) {
        eprintln!("sluice passwd: cannot read the password from stdin: {e}");
        return ExitCode::from(1);
    }
    let pass = line.strip_suffix(b"\n").map(|l| l.strip_suffix(b"\r").unwrap_or(l)).unwrap_or(&line);
    let hash = if pass.is_empty() { None } else { Some(sluice::smtp::auth::hash_password(pass)) };
    // Overwrite the password before the buffer is freed.
    line.fill(0);
    std::hint::black_box(&line);
    let printed = match hash {
        None => {
            eprintln!("sluice passwd: empty password (write it as one line on stdin)");
            return ExitCode::from(1);
        }
        Some(Err(e)) => {
            eprintln!("sluice passwd: cannot hash the password: {e}");
            return ExitCode::from(1);
        }
        Some(Ok(phc)) => writeln!(std::io::stdout().lock(), "{user}:{phc}"),
    };
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice passwd: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

/// `sluice dkim-keygen DOMAIN SELECTOR [--ed25519 | --bits N] --out PEM`: makes a key with
/// aws-lc-rs (the signer's own library), writes it as PKCS#8 PEM with mode 0600 (never over an
/// existing file), and prints the TXT record to publish. The key is read back through the
/// signer's own parser first, so what is written is what `--dkim-key` takes.
fn dkim_keygen(a: &KeygenArgs) -> ExitCode {
    use aws_lc_rs::encoding::AsDer as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let der = if a.ed25519 {
        aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| "an Ed25519")
    } else {
        // `--bits` takes only the sizes aws-lc-rs generates (cli.rs).
        let size = match a.bits {
            3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
            4096 => aws_lc_rs::rsa::KeySize::Rsa4096,
            _ => aws_lc_rs::rsa::KeySize::Rsa2048,
        };
        aws_lc_rs::rsa::KeyPair::generate(size)
            .and_then(|k| k.as_der())
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| "an RSA")
    };
    let pem = match der {
        Ok(der) => pem_encode("PRIVATE KEY", &der),
        Err(what) => {
            eprintln!("sluice dkim-keygen: cannot make {what} key");
            return ExitCode::from(1);
        }
    };
    let key = match sluice::dkim::SigningKey::from_pem(&a.selector, pem.as_bytes()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("sluice dkim-keygen: the new key does not load: {e}");
            return ExitCode::from(1);
        }
    };
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&a.out);
    if let Err(e) = file.and_then(|mut f| f.write_all(pem.as_bytes()).and_then(|()| f.sync_all())) {
        eprintln!("sluice dkim-keygen: cannot write {}: {e}", a.out.display());
        return ExitCode::from(1);
    }
    let line = sluice::dkim::key::zone_line(&a.domain, &a.selector, &key.record());
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice dkim-keygen: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

/// PEM armour (RFC 7468 §2): base64 in lines of 64.
fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
