//! Raw socket set-up and I/O classification. With `spool/segment.rs`, the only place allowed
//! `unsafe`; every libc call goes through `crate::sys::syscall!`.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, RawFd};

use crate::sys::syscall;

/// Creates a non-blocking listening socket with SO_REUSEADDR (a restart binds at once despite
/// connections in TIME_WAIT), IPV6_V6ONLY for IPv6 addresses, and a deep backlog.
///
/// `SO_REUSEPORT` only when `reuse_port` is asked for (one process per core sharing a port,
/// each with its own spool shard): set by default, a second relay started by mistake on the
/// same port would silently take a share of the connections and strand mail in its own
/// spool. Without it, that second bind fails with `AddrInUse`.
pub fn listener(addr: SocketAddr, reuse_port: bool) -> io::Result<mio::net::TcpListener> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket takes no pointers.
    let fd: RawFd = syscall!(socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0))?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else; the listener
    // takes ownership and closes it on drop (including on the error paths below).
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let one_ptr = &one as *const libc::c_int as *const libc::c_void;
    let len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY (the three setsockopt calls): `fd` is open; `one_ptr` points at a live c_int of
    // `len` bytes, which the call only reads.
    syscall!(setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, one_ptr, len))?;
    if reuse_port {
        // SAFETY: as above.
        syscall!(setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, one_ptr, len))?;
    }
    if addr.is_ipv6() {
        // SAFETY: as above.
        syscall!(setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, one_ptr, len))?;
    }
    let (storage, slen) = sockaddr(addr);
    let sa = &storage as *const libc::sockaddr_storage as *const libc::sockaddr;
    // SAFETY: `sa` points at `storage`, live for the call, holding a sockaddr of `slen` bytes
    // that the call only reads.
    syscall!(bind(fd, sa, slen))?;
    // SAFETY: listen takes no pointers.
    syscall!(listen(fd, 4096))?;
    Ok(mio::net::TcpListener::from_std(listener))
}

/// Starts a non-blocking TCP connect to `addr` with `TCP_NODELAY` set. SMTP is a dialogue of
/// small writes (a pipelined command group, the tail of a body chunk, the final `.`) each
/// followed by a wait for the reply: under Nagle's algorithm such a short segment waits for
/// the ACK of the previous one, which the peer delays by up to ~40 ms (RFC 1122 §4.2.3.2,
/// §4.2.3.4), a stall per message. No other option is wanted: no `SO_KEEPALIVE` (every SMTP
/// phase has its own deadline, RFC 5321 §4.5.3.2) and no `SO_LINGER` (close must not block).
pub fn connect(addr: SocketAddr) -> io::Result<mio::net::TcpStream> {
    let sock = mio::net::TcpStream::connect(addr)?;
    // Allowed while the connect is in progress; the option then holds for the connection.
    sock.set_nodelay(true)?;
    Ok(sock)
}

/// [`connect`] from a given local address (an egress source): the socket binds `source:0`
/// before the non-blocking connect, so the kernel picks only the port. An address family
/// that does not match the destination's is refused here (`EAFNOSUPPORT`), not sent from
/// another address. `None`: the kernel picks the address too, as [`connect`].
pub fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<mio::net::TcpStream> {
    let Some(ip) = source else { return connect(addr) };
    if ip.is_ipv4() != addr.is_ipv4() {
        return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
    }
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket takes no pointers.
    let fd: RawFd = syscall!(socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0))?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else; the stream takes
    // ownership and closes it on drop (including on the error paths below).
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let (local, llen) = sockaddr(SocketAddr::new(ip, 0));
    // SAFETY: the pointer is to `local`, live for the call, holding a sockaddr of `llen`
    // bytes that the call only reads.
    syscall!(bind(fd, &local as *const libc::sockaddr_storage as *const libc::sockaddr, llen))?;
    let (remote, rlen) = sockaddr(addr);
    // SAFETY: as for bind, with `remote` and `rlen`.
    match syscall!(connect(fd, &remote as *const libc::sockaddr_storage as *const libc::sockaddr, rlen)) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let sock = mio::net::TcpStream::from_std(stream);
    sock.set_nodelay(true)?;
    Ok(sock)
}

/// Whether `ip` is an address of this host: a socket binds `ip:0` and is closed at once
/// (nothing is sent). `EADDRNOTAVAIL` means it is not assigned here.
pub fn check_local(ip: IpAddr) -> io::Result<()> {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0)).map(drop)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Raises the soft open-files limit to the hard limit (10,000 connections need more than the
/// usual 1,024). Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a live, writable rlimit the call fills in.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a live rlimit the call only reads.
        syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))?;
    }
    Ok(lim.rlim_cur)
}

/// What one read or write did, classified once.
#[derive(Debug)]
pub enum IoResult {
    /// Moved this many bytes (never 0 for reads: see `Closed`).
    Done(usize),
    /// The socket has nothing more now.
    WouldBlock,
    /// Orderly shutdown by the peer (read returned 0).
    Closed,
    /// Anything else: the connection is unusable.
    Error(io::Error),
}

/// Reads once into `buf`.
pub fn read(sock: &mut mio::net::TcpStream, buf: &mut [u8]) -> IoResult {
    loop {
        return match sock.read(buf) {
            Ok(0) => IoResult::Closed,
            Ok(n) => IoResult::Done(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => IoResult::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => IoResult::Error(e),
        };
    }
}

/// Writes once from `buf`.
pub fn write(sock: &mut mio::net::TcpStream, buf: &[u8]) -> IoResult {
    loop {
        return match sock.write(buf) {
            Ok(n) => IoResult::Done(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => IoResult::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => IoResult::Error(e),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outbound sockets carry `TCP_NODELAY` from the start (checked with getsockopt), so no
    /// body tail or command waits for a delayed ACK.
    #[test]
    fn connect_sets_nodelay() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = connect(l.local_addr().unwrap()).unwrap();
        assert!(sock.nodelay().unwrap(), "TCP_NODELAY not set on an outbound socket");
        let (accepted, _) = l.accept().unwrap();
        assert!(sock.nodelay().unwrap());
        drop(accepted);
    }

    /// A connection from a source address leaves from it; an address of another host, or of
    /// the other family, is refused before anything is sent.
    #[test]
    fn connect_from_binds_the_source_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = connect_from(l.local_addr().unwrap(), Some("127.0.0.3".parse().unwrap())).unwrap();
        let (accepted, peer) = l.accept().unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.3");
        assert!(sock.nodelay().unwrap());
        drop((sock, accepted));
        let e = connect_from(l.local_addr().unwrap(), Some("::1".parse().unwrap())).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAFNOSUPPORT));
        assert!(check_local("127.0.0.2".parse().unwrap()).is_ok());
        let e = check_local("192.0.2.1".parse().unwrap()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL));
    }

    /// A port is shared only when both listeners ask for it; otherwise the second bind fails.
    #[test]
    fn reuse_port_only_when_asked() {
        let a = listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = a.local_addr().unwrap();
        let e = listener(addr, false).expect_err("a second listener took the port");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(listener(addr, true).is_err(), "the first listener did not opt in");
        let b = listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let shared = listener(b.local_addr().unwrap(), true).expect("--reuse-port shares the port");
        drop((a, b, shared));
    }
}
