//! A synchronous rtnetlink client.
//!
//! The CNI plugin lives for a few milliseconds per pod: an async runtime and a connection task would cost more than
//! the dozen requests it sends. Each request here is written, then its replies are read until the kernel's ACK or
//! error. Messages are netlink-packet-route's types; rtnetlink is used only for its message builders, re-exported as
//! [`build`].
//!
//! A socket is bound to the namespace it was opened in: [`Rtnl::in_netns`] opens one inside another namespace
//! without moving the calling thread there for longer than the `socket(2)` call.

mod link;
mod monitor;
mod neighbour;
mod route;

pub use link::{Link, VxlanInfo};
pub use monitor::{Monitor, GROUP_IPV4_ROUTE, GROUP_IPV6_ROUTE, GROUP_LINK, GROUP_NEIGH};
pub use neighbour::Neighbour;
pub use route::RouteSpec;

pub use netlink_packet_route as packet;
/// Message builders (links, addresses, routes).
pub use rtnetlink as build;

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_MULTIPART,
    NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use netns::NetNs;

#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink reply could not be decoded: {0}")]
    Decode(String),
    #[error("{0}")]
    Invalid(String),
}

impl RtnlError {
    /// The errno the kernel answered with, if it was a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno() == Some(errno)
    }

    /// The object did not exist (deleting twice, a link already gone, ...).
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ENODEV) | Some(libc::ESRCH) | Some(libc::ENOENT) | Some(libc::EADDRNOTAVAIL))
    }

    pub fn is_exists(&self) -> bool {
        self.is(libc::EEXIST)
    }
}

pub type Result<T> = std::result::Result<T, RtnlError>;

/// One rtnetlink socket.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket in the calling thread's namespace.
    pub fn new() -> Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(RtnlError::Socket)?;
        // Errors carry the kernel's extended ack message where it has one; harmless if unsupported.
        let _ = socket.set_ext_ack(true);
        Ok(Rtnl { socket, seq: 0, buf: vec![0; 64 * 1024] })
    }

    /// A socket bound to `ns`.
    pub fn in_netns(ns: &NetNs) -> Result<Rtnl> {
        let _guard = ns.enter().map_err(RtnlError::Socket)?;
        Rtnl::new()
    }

    /// Sends one request and collects the messages of its reply (a dump's entries, or nothing for an ACK). A dump
    /// the kernel marks as interrupted (the table changed under it) is run again, a few times at most.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: impl Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..5 {
            match self.request_once(msg.clone(), flags, &op)? {
                (replies, false) => return Ok(replies),
                (_, true) => continue,
            }
        }
        Err(RtnlError::Kernel { op: op(), source: io::Error::from_raw_os_error(libc::EINTR) })
    }

    fn request_once(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &impl Fn() -> String,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool)> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        self.socket.send(&out, 0).map_err(RtnlError::Socket)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            // SAFETY: recv into our own buffer, bounded by its length.
            let n =
                unsafe { libc::recv(self.socket_fd(), self.buf.as_mut_ptr() as *mut libc::c_void, self.buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RtnlError::Socket(e));
            }
            let mut data = &self.buf[..n as usize];
            while !data.is_empty() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(data)
                    .map_err(|e| RtnlError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 || len > data.len() {
                    return Err(RtnlError::Decode(format!("bad message length {len}")));
                }
                data = &data[len.next_multiple_of(4).min(data.len())..];
                if msg.header.sequence_number != seq {
                    continue; // a late reply to an earlier request
                }
                let multipart = msg.header.flags & NLM_F_MULTIPART == NLM_F_MULTIPART;
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR == NLM_F_DUMP_INTR;
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok((replies, interrupted)),
                            Some(_) => Err(RtnlError::Kernel { op: op(), source: e.to_io() }),
                        };
                    }
                    // A dump can end in an error of its own (e.g. EMSGSIZE): not a complete answer.
                    NetlinkPayload::Done(d) if d.code < 0 => {
                        return Err(RtnlError::Kernel { op: op(), source: io::Error::from_raw_os_error(-d.code) });
                    }
                    NetlinkPayload::Done(_) => return Ok((replies, interrupted)),
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && !multipart && flags & NLM_F_ACK == 0 {
                            return Ok((replies, interrupted));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn socket_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.socket.as_raw_fd()
    }

    /// A request answered by an ACK.
    pub fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16, op: impl Fn() -> String) -> Result<()> {
        self.request(msg, flags | NLM_F_ACK, op).map(|_| ())
    }

    /// A dump request.
    pub fn dump(&mut self, msg: RouteNetlinkMessage, op: impl Fn() -> String) -> Result<Vec<RouteNetlinkMessage>> {
        self.request(msg, NLM_F_DUMP, op)
    }
}

/// Turns the `sysctl` name into its /proc path and writes the value, skipping the write when it is already set
/// (a write is a syscall and an audit event; reading is cheaper). Applies to the calling thread's namespace.
pub fn sysctl_ensure(name: &str, value: &str) -> io::Result<()> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    if std::fs::read_to_string(&path).map(|v| v.trim() == value).unwrap_or(false) {
        return Ok(());
    }
    std::fs::write(&path, value)
}
