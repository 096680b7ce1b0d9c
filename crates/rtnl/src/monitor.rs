use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::{Result, RtnlError};

/// rtnetlink multicast groups (RTNLGRP_*).
pub const GROUP_LINK: u32 = 1;
pub const GROUP_NEIGH: u32 = 3;
pub const GROUP_IPV4_ROUTE: u32 = 7;
pub const GROUP_IPV6_ROUTE: u32 = 11;

/// A socket that receives the kernel's change notifications for the groups it joined, in the namespace it was
/// created in.
pub struct Monitor {
    socket: Socket,
    buf: Vec<u8>,
}

impl Monitor {
    pub fn new(groups: &[u32]) -> Result<Monitor> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind(&SocketAddr::new(0, 0)).map_err(RtnlError::Socket)?;
        for g in groups {
            socket.add_membership(*g).map_err(RtnlError::Socket)?;
        }
        Ok(Monitor { socket, buf: vec![0; 256 * 1024] })
    }

    /// Blocks for the next batch of notifications. ENOBUFS (the kernel dropped some) is reported as an empty
    /// batch: the caller should treat it as "something changed".
    pub fn next(&mut self) -> Result<Vec<RouteNetlinkMessage>> {
        use std::os::fd::AsRawFd;
        // SAFETY: recv into our own buffer, bounded by its length.
        let n = unsafe {
            libc::recv(self.socket.as_raw_fd(), self.buf.as_mut_ptr() as *mut libc::c_void, self.buf.len(), 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::EINTR) => Ok(Vec::new()),
                _ => Err(RtnlError::Socket(e)),
            };
        }
        let mut out = Vec::new();
        let mut data = &self.buf[..n as usize];
        while !data.is_empty() {
            let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(data) else { break };
            let len = msg.header.length as usize;
            if len == 0 || len > data.len() {
                break;
            }
            data = &data[len.next_multiple_of(4).min(data.len())..];
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                out.push(m);
            }
        }
        Ok(out)
    }
}
