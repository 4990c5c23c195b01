//! Heap allocations on the steady-state TLS path, counted by a global allocator.
//!
//! Its own test binary so that the counting allocator (a `#[global_allocator]` is per binary)
//! wraps only this test, not every unit test of the library. It drives the public
//! `net::tls::TlsSession` API over in-memory pipes, as the event loop does over sockets.
#![allow(unsafe_code)]

use sluice::net::tls::{ClientTls, TlsFlush, TlsRead, TlsSession};

#[path = "common/tls_kit.rs"]
mod tls_kit;
use tls_kit::{server_tls, Pipe};

/// Moves bytes both ways until neither side has anything to say.
fn pump(a: &mut TlsSession, ap: &mut Pipe, b: &mut TlsSession, bp: &mut Pipe) {
    let mut buf = [0u8; 4096];
    for _ in 0..50 {
        let _ = a.flush(ap);
        bp.rx.extend(ap.tx.drain(..));
        let _ = b.flush(bp);
        ap.rx.extend(bp.tx.drain(..));
        while let TlsRead::Data(_) = a.read(ap, &mut buf) {}
        while let TlsRead::Data(_) = b.read(bp, &mut buf) {}
        if !a.wants_write() && !b.wants_write() && ap.rx.is_empty() && bp.rx.is_empty() {
            break;
        }
    }
}

/// A server and an unverifying client with the handshake done over two pipes:
/// (server, client, server's pipe, client's pipe).
fn handshaken(tag: &str) -> (TlsSession, TlsSession, Pipe, Pipe) {
    let mut server = TlsSession::server(&server_tls(tag)).unwrap();
    let mut client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
    let (mut sp, mut cp) = (Pipe::default(), Pipe::default());
    pump(&mut client, &mut cp, &mut server, &mut sp);
    (server, client, sp, cp)
}

/// Counts heap allocations made by the current thread (other tests run on other threads),
/// delegating the work to the system allocator.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCS: Cell<u64> = const { Cell::new(0) };
        static SIZES: Cell<(usize, usize)> = const { Cell::new((usize::MAX, 0)) };
    }

    fn bump(size: usize) {
        // `try_with`: the allocator also runs while thread-locals are torn down.
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        let _ = SIZES.try_with(|s| {
            let (lo, hi) = s.get();
            s.set((lo.min(size), hi.max(size)));
        });
    }

    /// Smallest and largest allocation this thread has made since the last call.
    pub fn take_sizes() -> (usize, usize) {
        SIZES.with(|s| s.replace((usize::MAX, 0)))
    }

    /// Allocations (including reallocations) this thread has made so far.
    pub fn allocs() -> u64 {
        ALLOCS.with(Cell::get)
    }

    pub struct Counting;

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    // SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
    // `GlobalAlloc` contract; the only addition is a thread-local counter that never
    // allocates (const-initialised `Cell<u64>`, no destructor).
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            bump(layout.size());
            // SAFETY: the caller's contract for `alloc` is passed on to `System` as is.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            bump(layout.size());
            // SAFETY: as for `alloc`.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            bump(new_size);
            // SAFETY: `ptr` and `layout` came from this allocator, which is `System`.
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` and `layout` came from this allocator, which is `System`.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}

/// Steady state: after the handshake, records each way cost this file no heap allocation.
/// The test counts this thread's allocations (and their sizes) over 100 round trips.
///
/// rustls 0.23 itself still allocates one buffer per record: its encrypter returns each
/// sealed record as a fresh `Vec` (which `WriteTraffic::encrypt` copies into our buffer),
/// and a decrypted record's plaintext is copied into a `Vec` that `ReadTraffic` hands out.
/// The sizes pin those down: exactly one allocation per record and stage, the size of
/// the sealed record when sending and of the plaintext when receiving, so anything this
/// file allocated would show.
#[test]
fn steady_state_records_allocate_only_in_rustls() {
    let (mut server, mut client, mut sp, mut cp) = handshaken("alloc");
    assert!(!server.is_handshaking() && !client.is_handshaking());
    assert_eq!(server.info().unwrap().version, "TLSv1.3");
    // The pipes keep their capacity once grown.
    for p in [&mut sp, &mut cp] {
        p.rx.reserve(64 * 1024);
        p.tx.reserve(64 * 1024);
    }
    let msg = [b'x'; 1024];
    let reply = [b'y'; 100];
    let mut buf = [0u8; 4096];
    // [client send, server receive, server send, client receive]: (allocations, sizes)
    let mut round = |client: &mut TlsSession, server: &mut TlsSession| {
        let mut stages = [(0, (0, 0)); 4];
        let mut stage = |i: usize, a0: u64| {
            stages[i] = (counting::allocs() - a0, counting::take_sizes());
        };
        let a = counting::allocs();
        counting::take_sizes();
        assert_eq!(client.write(&msg), msg.len());
        assert!(matches!(client.flush(&mut cp), TlsFlush::Done));
        stage(0, a);
        sp.rx.extend(cp.tx.drain(..));
        let a = counting::allocs();
        counting::take_sizes();
        let mut got = 0;
        while let TlsRead::Data(n) = server.read(&mut sp, &mut buf) {
            got += n;
        }
        assert_eq!(got, msg.len());
        stage(1, a);
        let a = counting::allocs();
        assert_eq!(server.write(&reply), reply.len());
        assert!(matches!(server.flush(&mut sp), TlsFlush::Done));
        stage(2, a);
        cp.rx.extend(sp.tx.drain(..));
        let a = counting::allocs();
        counting::take_sizes();
        let mut got = 0;
        // A reader buffer shorter than the record: the rest is handed out next time.
        while let TlsRead::Data(n) = client.read(&mut cp, &mut buf[..64]) {
            got += n;
        }
        assert_eq!(got, reply.len());
        stage(3, a);
        stages
    };
    for _ in 0..10 {
        round(&mut client, &mut server);
    }
    // TLS 1.3 with AES-GCM or ChaCha20-Poly1305: a sealed record is the 5-byte header,
    // the plaintext, the 1-byte content type and the 16-byte tag.
    let sealed = |n: usize| 5 + n + 1 + 16;
    let expect =
        [(1, (sealed(1024), sealed(1024))), (1, (1024, 1024)), (1, (sealed(100), sealed(100))), (1, (100, 100))];
    for i in 0..100 {
        let stages = round(&mut client, &mut server);
        assert_eq!(stages, expect, "round {i}: [client send, server receive, server send, client receive]");
    }
}
