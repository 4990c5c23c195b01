//! SIGTERM/SIGINT (stop) and SIGHUP (reload the certificate) as loop events (signal-hook's
//! self-pipe, registered with mio).

use std::io;

use mio::{Interest, Registry, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

/// The registered signal source.
pub struct SignalSource {
    signals: Signals,
}

impl SignalSource {
    /// Installs handlers for SIGTERM, SIGINT and SIGHUP and registers them under `token`.
    pub fn register(registry: &Registry, token: Token) -> io::Result<SignalSource> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        registry.register(&mut signals, token, Interest::READABLE)?;
        Ok(SignalSource { signals })
    }

    /// Termination signals and SIGHUPs received since the last call.
    pub fn drain(&mut self) -> (usize, usize) {
        let (mut stop, mut hup) = (0, 0);
        for sig in self.signals.pending() {
            if sig == SIGHUP {
                hup += 1;
            } else {
                stop += 1;
            }
        }
        (stop, hup)
    }
}
