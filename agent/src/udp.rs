//! flannel's udp backend: a TUN device `flannel0` holding `<subnet>.0` with the cluster network's prefix (so the
//! kernel sends every packet for another node's pods into it), and a userspace loop carrying each packet as the
//! payload of a UDP datagram to the owning node's PublicIP on port 8285, and back. 28 bytes of overhead (IP + UDP
//! headers), so the pod MTU is the external MTU less 28. Slow by design: every packet crosses into userspace twice.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};
use ipnet::{IpNet, Ipv4Net};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

pub const DEVICE: &str = "flannel0";

/// Remote subnets and the public IP that owns each, shared with the watch loop.
pub type Routes = Arc<RwLock<BTreeMap<Ipv4Net, Ipv4Addr>>>;

/// Opens (creating) the TUN device in this thread's namespace.
fn open_tun(name: &str) -> Result<OwnedFd> {
    // SAFETY: plain open(2)/ioctl(2) on a descriptor we own; `ifr` is zeroed and sized as the kernel expects.
    unsafe {
        let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        if libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &ifr) < 0 {
            return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
        }
        Ok(fd)
    }
}

/// Creates flannel0 with `<subnet>.0/<network prefix>`, the MTU, up; returns its descriptor (the device lives
/// as long as it is open).
pub fn setup(own: Ipv4Net, network: Ipv4Net, mtu: u32) -> Result<OwnedFd> {
    let fd = open_tun(DEVICE)?;
    let mut rt = rtnl::Rtnl::new()?;
    let link = rt.link_get(DEVICE)?.context("flannel0 vanished")?;
    let msg = rtnl::build::LinkMessageBuilder::<rtnl::build::LinkUnspec>::new().index(link.index).mtu(mtu).up().build();
    rt.link_set(msg, DEVICE)?;
    let addr = IpNet::new(IpAddr::V4(own.network()), network.prefix_len())?;
    rt.address_add(link.index, addr, false)?;
    Ok(fd)
}

/// Carries packets between flannel0 and UDP `port` until an error.
pub async fn run(tun: OwnedFd, port: u16, routes: Routes) -> Result<()> {
    // SAFETY: `tun` is an open TUN descriptor we own, moved into the AsyncFd that will close it.
    let tun =
        Arc::new(unsafe { AsyncFd::register(tun) }.map_err(|_| anyhow::anyhow!("registering flannel0 with tokio"))?);
    let sock = Arc::new(UdpSocket::bind(("0.0.0.0", port)).await.with_context(|| format!("binding UDP {port}"))?);

    let (t, s) = (tun.clone(), sock.clone());
    let outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = read_tun(&t, &mut buf).await?;
            if n < 20 || buf[0] >> 4 != 4 {
                continue; // only IPv4 is carried
            }
            let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
            let peer = routes.read().unwrap().iter().find(|(net, _)| net.contains(&dst)).map(|(_, ip)| *ip);
            if let Some(peer) = peer {
                let _ = s.send_to(&buf[..n], SocketAddr::new(IpAddr::V4(peer), port)).await;
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    });
    let inbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, _) = sock.recv_from(&mut buf).await?;
            if n >= 20 {
                write_tun(&tun, &buf[..n]).await?;
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    });
    tokio::select! {
        r = outbound => r??,
        r = inbound => r??,
    }
    bail!("udp backend loop ended")
}

async fn read_tun(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        // SAFETY: read(2) into our buffer, bounded by its length.
        match guard.try_io(|f| {
            let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn write_tun(fd: &AsyncFd<OwnedFd>, pkt: &[u8]) -> std::io::Result<()> {
    loop {
        let mut guard = fd.writable().await?;
        // SAFETY: write(2) of our buffer.
        match guard.try_io(|f| {
            let n = unsafe { libc::write(f.as_raw_fd(), pkt.as_ptr() as *const libc::c_void, pkt.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

/// The remote subnets of a lease set (ours excluded).
pub fn routes_of(own: &Ipv4Net, leases: &crate::registry::Leases) -> BTreeMap<Ipv4Net, Ipv4Addr> {
    leases.iter().filter(|(k, _)| k.subnet != *own).map(|(k, a)| (k.subnet, a.public_ip)).collect()
}
