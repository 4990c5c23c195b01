//! SIGTERM/SIGINT as loop events (signal-hook's self-pipe, registered with mio).

use std::io;

use mio::{Interest, Registry, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

/// The registered signal source.
pub struct SignalSource {
    signals: Signals,
}

impl SignalSource {
    /// Installs handlers for SIGTERM and SIGINT and registers them under `token`.
    pub fn register(registry: &Registry, token: Token) -> io::Result<SignalSource> {
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        registry.register(&mut signals, token, Interest::READABLE)?;
        Ok(SignalSource { signals })
    }

    /// Number of termination signals received since the last call.
    pub fn drain(&mut self) -> usize {
        self.signals.pending().count()
    }
}
