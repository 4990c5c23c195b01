//! The socket side of delivery: executes the pure [`Engine`]'s actions — lookups through the
//! relay's DNS client, non-blocking connects, a [`ClientSession`] driven over each socket,
//! outcome and bounce records in the spool, log lines — and reports what happened back to it.
//!
//! Nothing here decides anything about a message: which connection gets which job, what a
//! reply means, when to retry and whom to bounce to is the engine's. This driver owns the
//! sockets (indexed by the engine's [`ConnId`]), the session timers (one heap, entries
//! re-armed lazily), the DNS client and the readiness bookkeeping of edge-triggered `mio`.

mod conn;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use mio::{Interest, Registry, Token};

pub use conn::{new_conn, Io, OutboundConn};

use crate::buf::BufPool;
use crate::delivery::bounce;
use crate::delivery::engine::{BounceRequest, Settlement};
use crate::delivery::route::Verdict;
use crate::delivery::sources::SourceId;
use crate::delivery::{Action, ConnFailure, ConnId, DeliveryConfig, Engine, Note, Now, StartFailure};
use crate::dns::resolver::{MxHost, MxPlan};
use crate::log::{Logger, V};
use crate::message::{Envelope, IdGen};
use crate::net::deadline::Deadlines;
use crate::net::dns::DnsConn;
use crate::net::tls::ClientTls;
use crate::net::token::{self, Kind};
use crate::queue::Queue;
use crate::smtp::client::{ClientConfig, ClientEvent, ClientSession, ClientTimeouts, TlsPolicy, TxRcpt, TxSpec};
use crate::smtp::client_auth::RelayCredentials;
use crate::spool::{Outcome, Spool, StoredMessage};

/// Rounds of reading, writing and session events per connection and call before it yields to
/// the others (edge-triggered readiness will not call again: it goes on the next pass).
const ROUNDS_PER_CALL: usize = 16;

/// Key of the engine's and the DNS client's own timers in the deadline table (connection keys
/// are dense from 0 and never reach it).
const TIMER_KEY: usize = u32::MAX as usize;

/// A connect that failed for lack of a local resource, not because of the destination.
fn is_local_shortage(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL | libc::ENOBUFS | libc::ENOMEM))
}

/// What the delivery side needs from the loop for one call.
pub struct Ctx<'a> {
    /// The spool (outcome records, bounce messages, bodies).
    pub spool: &'a mut Spool,
    /// Event log.
    pub log: &'a mut Logger,
    /// Queue ids for bounces.
    pub ids: &'a mut IdGen,
    /// Buffers.
    pub bufs: &'a mut BufPool,
    /// Registry for new sockets.
    pub registry: &'a Registry,
    /// The loop's one deadline table: session timers of the connections, the engine's next
    /// deadline and the DNS client's, each under its own token.
    pub deadlines: &'a mut Deadlines<Token>,
    /// Monotonic now (read once per loop turn).
    pub now: Instant,
    /// Wall clock, Unix ms.
    pub wall_ms: u64,
}

impl Ctx<'_> {
    fn at(&self) -> Now {
        Now { at: self.now, wall_ms: self.wall_ms }
    }
}

/// Socket-side settings.
#[derive(Clone)]
pub struct OutboundConfig {
    /// Client timeouts.
    pub timeouts: ClientTimeouts,
    /// TLS client settings, no certificate check.
    pub tls: ClientTls,
    /// TLS client settings with the certificate checked (`verify`), when loaded.
    pub verified: Option<ClientTls>,
    /// Our own listening addresses: a mail exchanger there is this relay (mail loop).
    pub own: Vec<SocketAddr>,
    /// `--relay-auth-file`: AUTH to the relay host, inside TLS only.
    pub auth: Option<Arc<RelayCredentials>>,
}

/// Outbound delivery on the relay's loop.
pub struct Outbound {
    engine: Engine,
    cfg: OutboundConfig,
    /// Sockets by `ConnId::key`.
    conns: Vec<Option<OutboundConn>>,
    dns: Option<DnsConn>,
    /// Whether an address is one of this machine's (asked once per address, for listeners on
    /// a wildcard address).
    local_ips: HashMap<IpAddr, bool>,
    /// Connections that spent their per-call budget with work left: driven on the next pass.
    again: Vec<ConnId>,
    /// Connections given work by an action: driven once the actions are done.
    kick: Vec<ConnId>,
}

impl Outbound {
    /// Delivery; `dns` is the resolver connection (None with a relay host that is an IP
    /// address, where no lookup is ever needed).
    pub fn new(delivery: DeliveryConfig, cfg: OutboundConfig, dns: Option<DnsConn>) -> Outbound {
        Outbound {
            engine: Engine::new(delivery),
            cfg,
            conns: Vec::new(),
            dns,
            local_ips: HashMap::new(),
            again: Vec::new(),
            kick: Vec::new(),
        }
    }

    /// The queue of undelivered recipients.
    pub fn queue(&self) -> &Queue {
        self.engine.queue()
    }

    /// Outbound connections open now.
    pub fn connections(&self) -> usize {
        self.engine.connections()
    }

    /// Queues a message that was just committed (or recovered).
    pub fn enqueue(&mut self, ctx: &mut Ctx<'_>, msg: &StoredMessage) {
        match ctx.spool.message(msg.loc) {
            Ok(view) => self.enqueue_with(ctx, msg, &view.envelope),
            Err(e) => ctx.log.event("spool_error", &[("id", V::D(&msg.id)), ("error", V::D(&e))]),
        }
    }

    /// Queues a message whose envelope the caller already has (the session that received it),
    /// saving a decode of the record.
    pub fn enqueue_with(&mut self, ctx: &mut Ctx<'_>, msg: &StoredMessage, env: &Envelope) {
        self.engine.handle_committed(msg, env, ctx.at());
        self.run(ctx);
    }

    /// True when ready work could be started now (the loop should not sleep).
    pub fn has_work(&self) -> bool {
        self.engine.has_work() || !self.again.is_empty()
    }

    /// One pass, every loop turn: connections with work left, the engine's timers and ready
    /// work, then the queries that produced leave.
    pub fn pump(&mut self, ctx: &mut Ctx<'_>) {
        for id in std::mem::take(&mut self.again) {
            self.drive(ctx, id);
        }
        self.engine.handle_timeout(ctx.at());
        self.run(ctx);
        self.end_pass(ctx);
    }

    /// Deadlines of ours that came due in the loop's table: a session timeout, the DNS
    /// client's retry, or the engine's (whose work [`Outbound::pump`] does every turn).
    pub fn on_deadlines(&mut self, ctx: &mut Ctx<'_>, due: &[Token]) {
        for &tok in due {
            match token::split(tok) {
                Some((Kind::Dns, _, _)) => {
                    if let Some(dns) = self.dns.as_mut() {
                        dns.handle_timeout(ctx.now);
                    }
                    self.dns_results(ctx);
                }
                Some((Kind::Outbound, generation, key)) if key != TIMER_KEY => {
                    self.session_timeout(ctx, ConnId { key: key as u32, generation });
                }
                _ => {}
            }
        }
        self.run(ctx);
        self.end_pass(ctx);
    }

    /// Ends a pass (done after every pump, event and deadline; the loop calls it after queueing
    /// recovered mail): the queries and retries the pass made leave now, and the engine's and
    /// the DNS client's next deadlines go into the table.
    pub fn end_pass(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(dns) = self.dns.as_mut() {
            dns.flush(ctx.now);
        }
        let engine = self.engine.next_deadline(ctx.at());
        let dns = self.dns.as_ref().and_then(DnsConn::next_deadline);
        for (tok, at) in
            [(token::make(Kind::Outbound, 0, TIMER_KEY), engine), (token::make(Kind::Dns, 0, TIMER_KEY), dns)]
        {
            match at {
                Some(at) => ctx.deadlines.arm(tok, at),
                None => ctx.deadlines.cancel(tok),
            }
        }
    }

    /// Handles a readiness event for an outbound or DNS token.
    pub fn on_event(&mut self, ctx: &mut Ctx<'_>, kind: Kind, generation: u32, key: usize, ev: &mio::event::Event) {
        match kind {
            Kind::Dns => {
                if let Some(dns) = self.dns.as_mut() {
                    dns.on_event(key, ctx.now);
                }
                self.dns_results(ctx);
            }
            Kind::Outbound => {
                let id = ConnId { key: key as u32, generation };
                let Some(conn) = self.conn_mut(id) else { return };
                conn.io.on_event(ev);
                self.drive(ctx, id);
                self.run(ctx);
            }
            _ => {}
        }
        self.end_pass(ctx);
    }

    /// New shaping rules (SIGHUP); see [`Engine::set_rules`].
    pub fn set_rules(&mut self, ctx: &mut Ctx<'_>, rules: crate::shaping::Rules) {
        self.with_engine(ctx, |e, now| e.set_rules(rules, now));
    }

    /// Runs `f` on the engine (a control request: suspend, resume, bounce...), then executes
    /// what it asked for and arms the timers.
    pub fn with_engine<R>(&mut self, ctx: &mut Ctx<'_>, f: impl FnOnce(&mut Engine, Now) -> R) -> R {
        let r = f(&mut self.engine, ctx.at());
        self.run(ctx);
        self.end_pass(ctx);
        r
    }

    /// The engine, to read (summaries, suspensions).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A queue flush (`sluice queue flush`, SIGUSR1); see [`Engine::flush`].
    pub fn flush(&mut self) -> (usize, usize) {
        self.engine.flush()
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut OutboundConn> {
        self.conns.get_mut(id.key as usize)?.as_mut().filter(|c| c.generation == id.generation)
    }

    /// Executes the engine's actions until there are none, then drives the connections they
    /// gave work to.
    fn run(&mut self, ctx: &mut Ctx<'_>) {
        loop {
            while let Some(action) = self.engine.poll_action() {
                self.execute(ctx, action);
            }
            let Some(id) = self.kick.pop() else { return };
            self.drive(ctx, id);
        }
    }

    fn execute(&mut self, ctx: &mut Ctx<'_>, action: Action) {
        match action {
            Action::Lookup { name, host } => self.lookup(ctx, &name, host),
            Action::Connect { conn, host, addr, tls, verify, source } => {
                self.connect(ctx, conn, host, addr, (tls, verify), source)
            }
            Action::Start { conn, next } => self.start(ctx, conn, next),
            Action::Quit { conn } => {
                if let Some(c) = self.conn_mut(conn) {
                    c.session.quit();
                    self.kick.push(conn);
                }
            }
            Action::Close { conn } => self.close(ctx, conn),
            Action::Settle(s) => self.settle(ctx, *s),
            Action::Bounce(b) => self.bounce(ctx, *b),
            Action::Release { segment, pins } => ctx.spool.release_message(segment, pins),
            Action::Note(note) => log_note(ctx.log, &note, &self.engine),
        }
    }

    fn lookup(&mut self, ctx: &mut Ctx<'_>, name: &str, host: bool) {
        let Some(dns) = self.dns.as_mut() else {
            // Only an IP relay host runs without a resolver.
            let result = match name.parse::<IpAddr>() {
                Ok(ip) => Ok(MxPlan { hosts: vec![MxHost { name: name.to_owned(), preference: 0, addrs: vec![ip] }] }),
                Err(_) => Err(crate::dns::resolver::DnsError::Timeout),
            };
            return self.route(ctx, name, result);
        };
        let poll = if host {
            dns.resolver_mut().lookup_host_addrs(name, ctx.now)
        } else {
            dns.resolver_mut().lookup_mx(name, ctx.now)
        };
        if let Poll::Ready(result) = poll {
            self.route(ctx, name, result);
        }
    }

    fn route(&mut self, ctx: &mut Ctx<'_>, name: &str, result: Result<MxPlan, crate::dns::resolver::DnsError>) {
        let (own, local_ips) = (&self.cfg.own, &mut self.local_ips);
        let mut is_self = |addr: SocketAddr| is_self(own, local_ips, addr);
        self.engine.handle_route(name, result, &mut is_self, ctx.at());
    }

    fn dns_results(&mut self, ctx: &mut Ctx<'_>) {
        let Some(dns) = self.dns.as_mut() else { return };
        let mut done = Vec::new();
        while let Some(d) = dns.resolver_mut().poll_done() {
            done.push(d);
        }
        while let Some(d) = dns.resolver_mut().poll_host_done() {
            done.push(d);
        }
        for (name, result) in done {
            self.route(ctx, &name, result);
        }
        self.run(ctx);
    }

    fn connect(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: ConnId,
        host: Box<str>,
        addr: SocketAddr,
        (policy, verify): (TlsPolicy, bool),
        source: SourceId,
    ) {
        if self.engine.paused(ctx.at()) {
            // A shortage found by an earlier connect of this batch: no doomed attempts.
            return self.engine.handle_connect_skipped(id);
        }
        // The egress source: its address is bound before the connect, its name said in EHLO.
        let (bind, helo_name) = match self.engine.source(source) {
            Some(s) => (Some(s.ip), s.ehlo.as_deref().unwrap_or(self.engine.hostname()).to_owned()),
            None => (None, self.engine.hostname().to_owned()),
        };
        // TCP_NODELAY from the start: see `socket::connect`.
        let mut sock = match crate::net::socket::connect_from(addr, bind) {
            Ok(s) => s,
            // Out of descriptors, ports or memory here: not the destination's fault.
            Err(e) if is_local_shortage(&e) => return self.engine.handle_local_shortage(id, &e.to_string(), ctx.at()),
            Err(e) => return self.engine.handle_conn_failed(id, ConnFailure::Connect(&e.to_string()), ctx.at()),
        };
        let tok = token::make(Kind::Outbound, id.generation, id.key as usize);
        if let Err(e) = ctx.registry.register(&mut sock, tok, Interest::READABLE | Interest::WRITABLE) {
            // A local problem: try again after a pause rather than strand the ready work.
            return self.engine.handle_local_shortage(id, &e.to_string(), ctx.at());
        }
        let session = ClientSession::new(
            ClientConfig { helo_name, timeouts: self.cfg.timeouts.clone(), tls: policy, auth: self.cfg.auth.clone() },
            ctx.now,
        );
        // A `verify` site without a loaded CA bundle cannot happen: config refuses it.
        let tls_config = match (policy, verify) {
            (TlsPolicy::Off, _) => None,
            (_, true) => self.cfg.verified.clone(),
            (_, false) => Some(self.cfg.tls.clone()),
        };
        let key = id.key as usize;
        if self.conns.len() <= key {
            self.conns.resize_with(key + 1, || None);
        }
        let mut conn = new_conn(sock, addr, host, id.generation, session, tls_config);
        if policy == TlsPolicy::Implicit {
            // RFC 8314 §3.3: the ClientHello is the first thing written once connected.
            conn.start_implicit_tls(ctx.bufs);
        }
        self.conns[key] = Some(conn);
        self.arm(ctx, id);
    }

    /// Starts the transaction the engine put on the connection.
    fn start(&mut self, ctx: &mut Ctx<'_>, id: ConnId, next: bool) {
        let Some((msg_id, loc, _)) = self.engine.job(id, next) else { return };
        let check_crc = !self.engine.first_attempt(id, next);
        let (view, body) = match ctx.spool.message_with_body(loc, check_crc) {
            Ok(v) => v,
            Err(e) => {
                ctx.log.event("spool_error", &[("id", V::D(&msg_id)), ("error", V::D(&e))]);
                return self.engine.handle_start_failed(id, next, StartFailure::Unreadable, ctx.at());
            }
        };
        let Some((_, _, rcpts)) = self.engine.job(id, next) else { return };
        let Some(conn) =
            self.conns.get_mut(id.key as usize).and_then(Option::as_mut).filter(|c| c.generation == id.generation)
        else {
            return;
        };
        let env = &view.envelope;
        let rcpts: Vec<TxRcpt<'_>> = rcpts
            .iter()
            .map(|&i| {
                let r = env.rcpt(i as usize);
                TxRcpt { addr: r.addr, notify: r.notify, orcpt: r.orcpt }
            })
            .collect();
        let spec = TxSpec {
            sender: &env.sender,
            rcpts,
            body_len: body.len as u64,
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            ret: env.ret,
            envid: &env.envid,
        };
        if !next {
            conn.session.start_transaction(spec);
            conn.body = Some(body);
            self.kick.push(id);
            return;
        }
        match conn.session.queue_next(spec) {
            Ok(()) => conn.next_body = Some(body),
            Err(refusal) => self.engine.handle_start_failed(id, next, StartFailure::Refused(refusal), ctx.at()),
        }
    }

    fn close(&mut self, ctx: &mut Ctx<'_>, id: ConnId) {
        let Some(slot) = self.conns.get_mut(id.key as usize) else { return };
        let Some(mut conn) = slot.take_if(|c| c.generation == id.generation) else { return };
        ctx.deadlines.cancel(token::make(Kind::Outbound, id.generation, id.key as usize));
        conn.close_tls();
        let _ = ctx.registry.deregister(&mut conn.io.sock);
        conn.release_buffers(ctx.bufs);
    }

    /// Appends the outcome records of a job and logs its attempt lines.
    fn settle(&mut self, ctx: &mut Ctx<'_>, s: Settlement) {
        let (env, body) = ctx.spool.envelope_and_body(s.loc).unwrap_or_default();
        let mut dkim = String::new();
        crate::dkim::signed_by(body, &mut dkim);
        let remote = s.remote.as_deref().unwrap_or("");
        let mut reply_text = Vec::new();
        for r in &s.rcpts {
            reply_text.clear();
            let _ = write!(reply_text, "{}", r.reply);
            let outcome = Outcome {
                status: r.verdict.status(),
                attempts: r.attempts,
                next_attempt_ms: r.next_ms,
                at_ms: s.at_ms,
                reply: &reply_text,
                remote: remote.as_bytes(),
                bounce: r.bounce,
            };
            let addr = if (r.rcpt as usize) < env.rcpt_count() { env.rcpt(r.rcpt as usize).addr } else { b"" };
            let outcome_name = match r.verdict {
                Verdict::Delivered => "delivered",
                Verdict::Deferred => "deferred",
                Verdict::Failed => "failed",
            };
            ctx.log.event(
                "delivery",
                &[
                    ("id", V::D(&s.id)),
                    ("rcpt", V::B(addr)),
                    ("domain", V::S(self.engine.dest_name(s.dest))),
                    ("remote", V::S(if remote.is_empty() { "-" } else { remote })),
                    ("tls", V::S(s.tls)),
                    ("reply", V::B(&reply_text)),
                    ("delay_ms", V::N(s.at_ms.saturating_sub(s.arrival_ms))),
                    ("attempt", V::N(u64::from(r.attempts))),
                    ("outcome", V::S(outcome_name)),
                    ("dkim", V::S(&dkim)),
                    ("source", V::S(self.engine.source_name(s.dest))),
                ],
            );
            match ctx.spool.append_outcome(s.id, r.rcpt, &outcome) {
                Ok(ticket) => self.engine.add_pin(s.msg, s.id, ticket),
                Err(e) => ctx.log.event("spool_error", &[("id", V::D(&s.id)), ("error", V::D(&e))]),
            }
        }
        if s.release {
            ctx.spool.release_message(s.loc.segment, self.engine.take_release(s.id));
        }
    }

    /// Builds and stores a DSN to the sender for the failed recipients (RFC 3464), and tells
    /// the engine whether it was stored.
    fn bounce(&mut self, ctx: &mut Ctx<'_>, b: BounceRequest) {
        let stored = store_bounce(ctx, self.engine.hostname(), &b);
        let now = ctx.at();
        match &stored {
            Some((msg, env)) => self.engine.handle_bounce(b.token, Some((msg, env)), now),
            None => self.engine.handle_bounce(b.token, None, now),
        }
    }

    /// Moves bytes and handles session events for one connection.
    fn drive(&mut self, ctx: &mut Ctx<'_>, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else { return };
        if !conn.connected {
            if !conn.io.writable {
                return;
            }
            // A non-blocking connect is done when the socket is writable; it worked if it has
            // a peer (take_error tells why not).
            match conn.io.sock.take_error() {
                Ok(None) if conn.io.sock.peer_addr().is_ok() => conn.connected = true,
                Ok(None) => return,
                Ok(Some(e)) | Err(e) => {
                    self.engine.handle_conn_failed(id, ConnFailure::Connect(&e.to_string()), ctx.at());
                    return self.run_here(ctx);
                }
            }
            self.engine.handle_connected(id);
        }
        for round in 0..ROUNDS_PER_CALL {
            let Some(conn) = self.conn_mut(id) else { return };
            if round == ROUNDS_PER_CALL - 1 {
                // Budget spent with work left: come back next pass, after other connections.
                self.again.push(id);
                return;
            }
            let body = conn.body.map_or(&[][..], |b| ctx.spool.body(b));
            let wio = conn.write(ctx.bufs, body);
            let rio = conn.read(ctx.bufs, ctx.now);
            if rio == Io::Closed || (!conn.greeted && (rio == Io::Failed || wio == Io::Failed)) {
                // Before the session is ready a reset counts like a refusal (next MX, then
                // back off), not as a lost connection that is simply reopened.
                conn.session.handle_closed();
            }
            let mut progressed = false;
            if let Some(info) = conn.take_tls_established() {
                // The session queued EHLO again: another round writes it.
                progressed = true;
                let (host, peer) = (&conn.host, conn.peer);
                ctx.log.event(
                    "tls",
                    &[
                        ("host", V::S(host)),
                        ("ip", V::D(&peer)),
                        ("version", V::S(info.version)),
                        ("cipher", V::S(info.cipher)),
                    ],
                );
                self.engine.handle_tls(id, info.version);
            }
            while let Some(ev) = self.conn_mut(id).and_then(|c| c.session.poll_event()) {
                progressed = true;
                self.on_session_event(ctx, id, ev);
            }
            if wio == Io::Failed || rio == Io::Failed {
                return self.io_failed(ctx, id);
            }
            if self.conn_mut(id).is_some_and(|c| c.session.can_queue_next())
                && self.engine.handle_can_queue(id, ctx.at())
            {
                // Its commands go out behind the current message: another round writes them.
                progressed = true;
                self.run_here(ctx);
            }
            if !progressed {
                // Flush whatever the events produced (a new transaction's commands).
                if let Some(conn) = self.conn_mut(id) {
                    let body = conn.body.map_or(&[][..], |b| ctx.spool.body(b));
                    if conn.write(ctx.bufs, body) == Io::Failed {
                        self.io_failed(ctx, id);
                    }
                }
                self.arm(ctx, id);
                return;
            }
        }
    }

    /// Reading or writing the socket of `id` failed (if it is still open): the engine settles
    /// its transaction, keeping the RCPT replies read so far.
    fn io_failed(&mut self, ctx: &mut Ctx<'_>, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else { return };
        let received = conn.session.rcpt_replies_so_far().to_vec();
        self.engine.handle_conn_failed(id, ConnFailure::Io { received: &received }, ctx.at());
        self.run_here(ctx);
    }

    /// Executes pending actions from inside [`Outbound::drive`]: connections they give work to
    /// are driven afterwards (by the caller's `run`), never recursively.
    fn run_here(&mut self, ctx: &mut Ctx<'_>) {
        while let Some(action) = self.engine.poll_action() {
            self.execute(ctx, action);
        }
    }

    fn on_session_event(&mut self, ctx: &mut Ctx<'_>, id: ConnId, ev: ClientEvent) {
        let now = ctx.at();
        match ev {
            ClientEvent::StartTls => {
                if let Some(conn) = self.conn_mut(id) {
                    conn.start_tls(ctx.bufs);
                }
            }
            ClientEvent::Ready => {
                if let Some(conn) = self.conn_mut(id) {
                    conn.greeted = true;
                }
                self.engine.handle_conn_ready(id, now);
            }
            ClientEvent::TransactionDone(result) => {
                if let Some(conn) = self.conn_mut(id) {
                    // The queued transaction (if any) is the session's current one now.
                    conn.body = conn.next_body.take();
                }
                self.engine.handle_tx_done(id, &result, now);
            }
            ClientEvent::Failed(failure) => {
                let Some(conn) = self.conn_mut(id) else { return };
                let tls_error = conn.tls_error.clone();
                let received = conn.session.rcpt_replies_so_far().to_vec();
                let failure =
                    ConnFailure::Session { failure: &failure, tls_error: tls_error.as_deref(), received: &received };
                self.engine.handle_conn_failed(id, failure, now);
            }
            ClientEvent::Closed => self.engine.handle_closed(id),
        }
        self.run_here(ctx);
    }

    /// Keeps the session timer of `id` at the session's deadline.
    fn arm(&mut self, ctx: &mut Ctx<'_>, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else { return };
        let tok = token::make(Kind::Outbound, id.generation, id.key as usize);
        match conn.session.next_deadline() {
            Some(d) => ctx.deadlines.arm(tok, d),
            None => ctx.deadlines.cancel(tok),
        }
    }

    /// The session timer of `id` came due.
    fn session_timeout(&mut self, ctx: &mut Ctx<'_>, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else { return };
        match conn.session.next_deadline() {
            Some(d) if d <= ctx.now => {
                conn.session.handle_timeout(ctx.now);
                self.drive(ctx, id);
            }
            Some(_) => self.arm(ctx, id),
            None => {}
        }
    }
}

/// True when `addr` is where this relay listens: a listener on that address, or on the
/// wildcard address of its family while the address is one of this machine's (a socket can be
/// bound to it).
fn is_self(own: &[SocketAddr], local_ips: &mut HashMap<IpAddr, bool>, addr: SocketAddr) -> bool {
    let ip = addr.ip();
    let mut wildcard = false;
    for l in own.iter().filter(|l| l.port() == addr.port()) {
        if l.ip() == ip {
            return true;
        }
        wildcard |= l.ip().is_unspecified() && l.is_ipv4() == ip.is_ipv4();
    }
    wildcard
        && *local_ips
            .entry(ip)
            .or_insert_with(|| ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
}

/// Logs a note of the engine (which names the egress sources of shaping changes).
fn log_note(log: &mut Logger, note: &Note, engine: &Engine) {
    match note {
        Note::Route { event, domain, error } => log.event(event, &[("domain", V::S(domain)), ("error", V::S(error))]),
        Note::NoRoute { domain, source, error } => {
            log.event("no_route", &[("domain", V::S(domain)), ("source", V::S(source)), ("error", V::S(error))])
        }
        Note::ConnectError { host, addr, error } => {
            log.event("connect_error", &[("host", V::S(host)), ("ip", V::D(addr)), ("error", V::S(error))])
        }
        Note::TlsFallback { host, addr, error } => log.event(
            "tls_fallback",
            &[
                ("host", V::S(host)),
                ("ip", V::D(addr)),
                ("error", V::S(error)),
                ("detail", V::S("TLS handshake failed; retrying in plaintext")),
            ],
        ),
        Note::TlsError { host, addr, error } => {
            log.event("tls_error", &[("host", V::S(host)), ("ip", V::D(addr)), ("error", V::S(error))])
        }
        Note::DestinationDown { domain, until_ms, error } => log.event(
            "destination_down",
            &[("domain", V::S(domain)), ("retry", V::S(&crate::message::iso8601(*until_ms))), ("error", V::S(error))],
        ),
        Note::Shaping(c) => {
            // Sites are per (egress source, site): the line names the source when there is one.
            let until = (c.until_ms != 0).then(|| crate::message::iso8601(c.until_ms));
            let source = c.source.and_then(|id| engine.source(id));
            // A change is rare (a rule matched, a hold ended): a small list is fine here.
            let mut fields = Vec::with_capacity(4);
            fields.push(("site", V::S(&c.site)));
            if let Some(s) = source {
                fields.push(("source", V::S(&s.name)));
            }
            fields.push(("reason", V::S(&c.reason)));
            if let Some(until) = &until {
                fields.push(("until", V::S(until)));
            }
            log.event(c.event, &fields);
        }
        Note::AuthFailed { host, addr, error } => {
            log.event("relay_auth_failed", &[("host", V::S(host)), ("ip", V::D(addr)), ("error", V::S(error))])
        }
    }
}

/// Builds the DSN for `b` and appends it to the spool, in a segment with room for the outcome
/// records that follow it (see `Spool::reserve_room`); `None` when it could not be stored.
fn store_bounce(ctx: &mut Ctx<'_>, hostname: &str, b: &BounceRequest) -> Option<(StoredMessage, Envelope)> {
    // Without a readable body the DSN still goes out, without the original's text.
    let (env, body) = match ctx.spool.message_with_body(b.loc, true) {
        Ok((view, body)) => (view.envelope, ctx.spool.body(body)),
        Err(_) => (ctx.spool.envelope(b.loc).ok()?, &[][..]),
    };
    let bounce_id = ctx.ids.next(ctx.wall_ms * 1000);
    let (benv, dsn_body) = bounce::build(hostname, b, &env, body, bounce_id, ctx.wall_ms);
    // The DSN and the outcome records that name it go into one segment.
    let need = crate::spool::format::message_record_len(&benv, &dsn_body).unwrap_or(0) + b.room;
    let stored = ctx.spool.reserve_room(need).and_then(|()| {
        ctx.spool.append_generated_message(bounce_id, ctx.wall_ms, &benv, &dsn_body).map(|(_, loc)| loc)
    });
    match stored {
        Ok(loc) => {
            ctx.log.event("bounce", &[("id", V::D(&bounce_id)), ("for", V::D(&b.id)), ("to", V::B(&env.sender))]);
            let msg = StoredMessage {
                id: bounce_id,
                loc,
                arrival_ms: ctx.wall_ms,
                rcpts: Vec::new(),
                pins: Default::default(),
            };
            Some((msg, benv))
        }
        Err(e) => {
            ctx.log.event("spool_error", &[("id", V::D(&bounce_id)), ("for", V::D(&b.id)), ("error", V::D(&e))]);
            None
        }
    }
}
