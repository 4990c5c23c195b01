//! The `sluice` binary: dispatches `serve`, `passwd` and `queue`. The only place that exits
//! the process.

use std::process::ExitCode;

use clap::Parser;
use sluice::cli::{Cli, Cmd};
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
                Err(e @ RunError::Poll(_)) | Err(e @ RunError::Spool(_)) | Err(e @ RunError::Listen(..)) => {
                    eprintln!("sluice: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Passwd { user } => {
            eprintln!("sluice passwd {user}: AUTH is not available in this build yet");
            ExitCode::from(1)
        }
        Cmd::Queue(args) => match sluice::admin::run(&args, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice queue: {e}");
                ExitCode::from(1)
            }
        },
    }
}
