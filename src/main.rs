//! The `sluice` binary: dispatches `serve`, `passwd` and `queue`. The only place that exits
//! the process.

use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;

use clap::Parser;
use sluice::admin;
use sluice::cli::{Cli, Cmd, QueueAction, QueueArgs};
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
                | Err(e @ RunError::Control(..)) => {
                    eprintln!("sluice: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Passwd { user } => passwd(&user),
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
    let scope = |s: &sluice::cli::ScopeArgs| match (&s.domain, &s.provider) {
        (Some(d), _) => format!("domain:{d}"),
        (None, Some(p)) => format!("provider:{p}"),
        // clap requires one of the two.
        (None, None) => String::new(),
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
