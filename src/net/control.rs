//! The control socket `DIR/control.sock` (mode 0600) on the relay's loop: `sluice queue`
//! sends one request line, gets one answer ([`crate::control`]), and the connection closes.
//!
//! Owns: the Unix listener (a stale socket file of a killed relay is replaced at start, the
//! file is removed at a clean exit), the client connections (non-blocking, edge-triggered:
//! read and write until `WouldBlock`), their deadline ([`REQUEST_TIMEOUT`] in the loop's
//! table, for a client that never sends or never reads), and [`serve`]: a request turned into
//! engine calls and an answer. Must never: block the loop, read more than
//! [`MAX_REQUEST`](crate::control::MAX_REQUEST) bytes of a request, or decide anything the
//! engine decides (what a suspension or a bounce means is the engine's).

use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::control::{Answer, BounceTarget, GroupBy, ProtoError, Request, SummaryRow, SuspensionRow, MAX_REQUEST};
use crate::delivery::engine::OperatorBounce;
use crate::log::V;
use crate::message::QueueId;
use crate::net::deadline::Deadlines;
use crate::net::outbound::{Ctx, Outbound};
use crate::net::token::{self, Kind};
use crate::shaping::Scope;
use crate::spool::suspensions::{self, SavedSuspension};

/// Time a client has for the whole exchange (send the line, read the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Key of the listener's token (connection keys are slab keys, far below it).
const LISTENER_KEY: usize = u32::MAX as usize;
/// Connections accepted per readiness event; more wait for the next turn.
const ACCEPTS_PER_CALL: usize = 64;

/// One client of the control socket.
struct ControlConn {
    sock: UnixStream,
    generation: u32,
    /// The request line read so far.
    input: Vec<u8>,
    /// The answer and how much of it is written; `None` while the request is read or served.
    output: Option<(Vec<u8>, usize)>,
    /// A whole request is read and waits in `Control::ready` for its answer.
    queued: bool,
}

/// What a connection's I/O came to.
enum Step {
    /// `WouldBlock` (or an answer is being made): wait for readiness.
    Wait,
    /// Done (answer written) or broken.
    Close,
    /// The request is complete: serve it.
    Request(Result<Request, ProtoError>),
}

impl ControlConn {
    fn progress(&mut self) -> Step {
        if self.queued {
            return Step::Wait;
        }
        if let Some((out, written)) = self.output.as_mut() {
            loop {
                match self.sock.write(&out[*written..]) {
                    Ok(n) if n > 0 => {
                        *written += n;
                        if *written == out.len() {
                            return Step::Close;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    _ => return Step::Close,
                }
            }
        }
        let mut chunk = [0u8; 1024];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    if self.input.contains(&b'\n') || self.input.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        // A line, EOF or too much: the request is complete (or refused as too long).
        if self.input.is_empty() {
            return Step::Close;
        }
        let end = memchr::memchr(b'\n', &self.input).map_or(self.input.len(), |i| i + 1);
        Step::Request(Request::decode(&self.input[..end.min(MAX_REQUEST + 1)]))
    }
}

/// The control listener and its connections.
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
    conns: Slab<ControlConn>,
    generation: u32,
    /// The listener was readable and not drained (the accept budget ran out).
    pending: bool,
    /// Connections whose request is complete: (key, generation, the decoded request).
    ready: Vec<(usize, u32, Result<Request, ProtoError>)>,
}

impl Control {
    /// Binds `DIR/control.sock` (replacing a stale file: only the holder of the spool's lock
    /// gets here, so no other relay uses it) with mode 0600, and registers it.
    pub fn bind(dir: &Path, registry: &Registry) -> io::Result<Control> {
        let path = dir.join(crate::control::SOCKET_NAME);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut listener = UnixListener::bind(&path)?;
        // Only the relay's user may control it (the file is created with the umask's mode;
        // `queue` commands of other users get EACCES).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        registry.register(&mut listener, token::make(Kind::Control, 0, LISTENER_KEY), Interest::READABLE)?;
        Ok(Control { listener, path, conns: Slab::new(), generation: 0, pending: true, ready: Vec::new() })
    }

    /// True when accepting was cut short by the budget (the loop must not sleep).
    pub fn has_pending(&self) -> bool {
        self.pending
    }

    /// A readiness event for a control token.
    pub fn on_event(
        &mut self,
        generation: u32,
        key: usize,
        registry: &Registry,
        deadlines: &mut Deadlines<Token>,
        now: Instant,
    ) {
        if key == LISTENER_KEY {
            self.pending = true;
            return self.accept(registry, deadlines, now);
        }
        if self.conns.get(key).is_some_and(|c| c.generation == generation) {
            self.drive(key, registry, deadlines);
        }
    }

    /// Accepts waiting clients, at most [`ACCEPTS_PER_CALL`].
    pub fn accept(&mut self, registry: &Registry, deadlines: &mut Deadlines<Token>, now: Instant) {
        for _ in 0..ACCEPTS_PER_CALL {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    self.generation = token::next_generation(self.generation);
                    let entry = self.conns.vacant_entry();
                    let tok = token::make(Kind::Control, self.generation, entry.key());
                    if registry.register(&mut sock, tok, Interest::READABLE | Interest::WRITABLE).is_err() {
                        continue;
                    }
                    deadlines.arm(tok, now + REQUEST_TIMEOUT);
                    entry.insert(ControlConn {
                        sock,
                        generation: self.generation,
                        input: Vec::new(),
                        output: None,
                        queued: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: drained. Anything else (EMFILE): the next event tries again.
                Err(_) => {
                    self.pending = false;
                    return;
                }
            }
        }
    }

    /// Reads the request (until its LF, EOF or the size cap) or writes the answer, until
    /// `WouldBlock`; a finished or broken connection is closed.
    fn drive(&mut self, key: usize, registry: &Registry, deadlines: &mut Deadlines<Token>) {
        let Some(c) = self.conns.get_mut(key) else { return };
        match c.progress() {
            Step::Wait => {}
            Step::Close => self.close(key, registry, deadlines),
            Step::Request(req) => {
                c.queued = true;
                self.ready.push((key, c.generation, req));
            }
        }
    }

    /// The requests read in full since the last call, to [`serve`] and [`Control::answer`].
    pub fn take_requests(&mut self) -> Vec<(usize, u32, Result<Request, ProtoError>)> {
        std::mem::take(&mut self.ready)
    }

    /// Sends `answer` on connection `key` (then closes it).
    pub fn answer(
        &mut self,
        key: usize,
        generation: u32,
        answer: &Answer,
        registry: &Registry,
        deadlines: &mut Deadlines<Token>,
    ) {
        let Some(c) = self.conns.get_mut(key).filter(|c| c.generation == generation) else { return };
        c.queued = false;
        c.output = Some((answer.encode().into_bytes(), 0));
        self.drive(key, registry, deadlines);
    }

    /// A control deadline came due: that client took too long, it is closed.
    pub fn expire(&mut self, tok: Token, registry: &Registry, deadlines: &mut Deadlines<Token>) {
        if let Some((Kind::Control, generation, key)) = token::split(tok) {
            if self.conns.get(key).is_some_and(|c| c.generation == generation && !c.queued) {
                self.close(key, registry, deadlines);
            }
        }
    }

    fn close(&mut self, key: usize, registry: &Registry, deadlines: &mut Deadlines<Token>) {
        let mut c = self.conns.remove(key);
        deadlines.cancel(token::make(Kind::Control, c.generation, key));
        let _ = registry.deregister(&mut c.sock);
    }
}

impl Drop for Control {
    /// A clean exit removes the socket file (`sluice queue` then says no relay runs).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Re-applies the operator's suspensions saved in the spool directory (expired ones are
/// dropped); logs what was applied and what was not.
pub fn restore(delivery: &mut Outbound, ctx: &mut Ctx<'_>, dir: &Path) {
    let (list, warnings) = match suspensions::load(dir, ctx.wall_ms) {
        Ok(l) => l,
        Err(e) => {
            ctx.log
                .event("spool_warning", &[("detail", V::S("cannot read the suspensions file")), ("error", V::D(&e))]);
            return;
        }
    };
    for w in &warnings {
        ctx.log.event("spool_warning", &[("detail", V::S(w))]);
    }
    for s in list {
        // The engine logs each one (`event=suspend`) as it is applied.
        let applied = s
            .scope
            .parse::<Scope>()
            .and_then(|scope| delivery.with_engine(ctx, |e, _| e.suspend(scope, s.until_ms, &s.reason, true)));
        if let Err(e) = applied {
            ctx.log.event("suspend_error", &[("scope", V::S(&s.scope)), ("error", V::S(&e))]);
        }
    }
}

/// Answers one request: engine calls, the suspensions file kept in step, actions run.
pub fn serve(req: Request, delivery: &mut Outbound, ctx: &mut Ctx<'_>, dir: &Path) -> Answer {
    let wall_ms = ctx.wall_ms;
    match req {
        Request::Suspend { scope, for_ms, reason } => {
            let scope = match scope.parse::<Scope>() {
                Ok(s) => s,
                Err(e) => return Answer::Failed(e),
            };
            let until_ms = wall_ms.saturating_add(for_ms);
            let name = scope.to_string();
            if let Err(e) = delivery.with_engine(ctx, |e, _| e.suspend(scope, until_ms, &reason, true)) {
                return Answer::Failed(e);
            }
            match save(delivery, ctx, dir) {
                Ok(()) => Answer::Done(format!("suspended {name} for {}s (until {until_ms} ms)", for_ms / 1000)),
                Err(e) => Answer::Failed(format!("suspended {name}, but not recorded (lost at a restart): {e}")),
            }
        }
        Request::Resume { scope } => {
            let scope = match scope.parse::<Scope>() {
                Ok(s) => s,
                Err(e) => return Answer::Failed(e),
            };
            if !delivery.with_engine(ctx, |e, _| e.resume(&scope)) {
                return Answer::Failed(format!("{scope} is not suspended"));
            }
            match save(delivery, ctx, dir) {
                Ok(()) => Answer::Done(format!("resumed {scope}")),
                Err(e) => Answer::Failed(format!("resumed {scope}, but the suspensions file still has it: {e}")),
            }
        }
        Request::Suspensions => Answer::Suspensions(
            delivery
                .engine()
                .suspensions(ctx_now(ctx))
                .into_iter()
                .map(|s| SuspensionRow {
                    scope: s.scope.to_string(),
                    site: s.site,
                    reason: s.reason,
                    left_s: s.until_ms.saturating_sub(wall_ms).div_ceil(1000),
                    manual: s.manual,
                })
                .collect(),
        ),
        Request::Bounce { target, reason } => {
            let (what, target) = match &target {
                BounceTarget::Id(text) => match QueueId::parse(text) {
                    Some(id) => (format!("message {text}"), OperatorBounce::Id(id)),
                    None => return Answer::Failed(format!("{text:?} is not a queue id")),
                },
                BounceTarget::Domain(d) => (format!("domain {d}"), OperatorBounce::Domain(d)),
            };
            let (rcpts, msgs) = delivery.with_engine(ctx, |e, now| e.bounce_queued(target, &reason, now));
            ctx.log.event(
                "admin_bounce",
                &[("target", V::S(&what)), ("recipients", V::N(rcpts as u64)), ("reason", V::S(&reason))],
            );
            if rcpts == 0 {
                Answer::Failed(format!("nothing queued (and not in flight) for {what}"))
            } else {
                Answer::Done(format!("bounced {rcpts} recipient(s) of {msgs} message(s) for {what}"))
            }
        }
        Request::Summary { by } => Answer::Summary(summary(delivery, ctx, by)),
    }
}

fn ctx_now(ctx: &Ctx<'_>) -> crate::delivery::Now {
    crate::delivery::Now { at: ctx.now, wall_ms: ctx.wall_ms }
}

/// Rows per domain or site, keyed in first-seen order.
fn summary(delivery: &Outbound, ctx: &Ctx<'_>, by: GroupBy) -> Vec<SummaryRow> {
    let engine = delivery.engine();
    let mut rows: Vec<(SummaryRow, u64)> = Vec::new();
    for d in engine.summary() {
        let key = match by {
            GroupBy::Domain => d.name,
            // A destination not routed yet has no site: its own name stands for it.
            GroupBy::Site => engine.site_name(d.dest).unwrap_or(d.name),
        };
        let suspended = engine.suspended(d.dest, ctx_now(ctx));
        let last = d.last_reply.map(ToString::to_string).unwrap_or_default();
        match rows.iter_mut().find(|(r, _)| r.key == key) {
            Some((r, oldest)) => {
                r.queued += d.queued;
                *oldest = (*oldest).min(d.oldest_arrival_ms);
                r.suspended |= suspended;
                if r.last_reply.is_empty() {
                    r.last_reply = last;
                }
            }
            None => rows.push((
                SummaryRow { key: key.to_owned(), queued: d.queued, oldest_s: 0, last_reply: last, suspended },
                d.oldest_arrival_ms,
            )),
        }
    }
    rows.into_iter()
        .map(|(mut r, oldest)| {
            r.oldest_s = ctx.wall_ms.saturating_sub(oldest) / 1000;
            r
        })
        .collect()
}

/// Writes the manual suspensions in force to `DIR/suspensions`.
fn save(delivery: &Outbound, ctx: &Ctx<'_>, dir: &Path) -> io::Result<()> {
    let list: Vec<SavedSuspension> = delivery
        .engine()
        .suspensions(ctx_now(ctx))
        .into_iter()
        .filter(|s| s.manual)
        .map(|s| SavedSuspension { scope: s.scope.to_string(), until_ms: s.until_ms, reason: s.reason })
        .collect();
    suspensions::save(dir, &list)
}
