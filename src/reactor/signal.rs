//! SIGTERM/SIGINT (stop), SIGHUP (reload the certificate) and SIGUSR1 (flush the queue: retry
//! deferred work now) as loop events (signal-hook's self-pipe, registered with mio).

use std::io;

use mio::{Interest, Registry, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;

use crate::sys::syscall;

/// The registered signal source.
pub struct SignalSource {
    signals: Signals,
}

impl SignalSource {
    /// Installs handlers for SIGTERM, SIGINT, SIGHUP and SIGUSR1 and registers them under
    /// `token`.
    pub fn register(registry: &Registry, token: Token) -> io::Result<SignalSource> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
        registry.register(&mut signals, token, Interest::READABLE)?;
        Ok(SignalSource { signals })
    }

    /// What arrived since the last call.
    pub fn drain(&mut self) -> Received {
        let mut r = Received::default();
        for sig in self.signals.pending() {
            match sig {
                SIGHUP => r.hup += 1,
                SIGUSR1 => r.flush += 1,
                _ => r.stop += 1,
            }
        }
        r
    }
}

/// Sends SIGUSR1 (flush the queue) to the relay with process id `pid`.
#[allow(unsafe_code)]
pub fn request_flush(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("process id out of range"))?;
    // SAFETY: kill takes no pointers; the pid comes from the lock of a spool whose holder is
    // alive (checked by the caller just before).
    syscall!(kill(pid, libc::SIGUSR1))?;
    Ok(())
}

/// Signals received, by what they ask for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Received {
    /// SIGTERM or SIGINT: stop.
    pub stop: usize,
    /// SIGHUP: reload the certificate.
    pub hup: usize,
    /// SIGUSR1: flush the queue.
    pub flush: usize,
}
