//! Load balancers' health check node ports (`healthCheckNodePort`), served as kube-proxy serves them. A load
//! balancer in front of a Service with externalTrafficPolicy Local probes that port on every node and sends traffic
//! only to the nodes that answer 200: those with a ready endpoint of the Service, since traffic is not forwarded to
//! other nodes. Nothing here depends on the dataplane: the ports are plain listening sockets of this process, one
//! per port on every address of the node, opened and closed as the desired set changes. The counts live behind a
//! lock read by every request, so they change without reopening anything.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy_state::ServicePort;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// What one health check port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub name: String,
    /// This node's ready endpoints of the Service.
    pub local_endpoints: usize,
}

/// Every health check port this node serves, and what each reports.
pub type Desired = BTreeMap<u16, Target>;

/// A request head longer than this is not a health check: the connection is closed unanswered.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head, and we to write the answer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed accept (out of descriptors, say): pause instead of spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const BACKLOG: u32 = 128;

/// The health check ports of `services`, with the Service each reports on and its local endpoint count.
pub fn desired(services: &[ServicePort]) -> Desired {
    let mut per_service: BTreeMap<(&str, &str), (u16, usize)> = BTreeMap::new();
    for sp in services {
        let (Some(port), Some(service)) = (sp.health_check_node_port, sp.service()) else { continue };
        // Ready ones only (kube-proxy's LocalReadyEndpoints): a node left with nothing but terminating endpoints
        // reports none, so that the load balancer drains it. A Service with several ports (or families) counts
        // by the port that has the most.
        let ready = sp.local.iter().filter(|e| e.ready).count();
        let entry = per_service.entry(service).or_insert((port, 0));
        entry.1 = entry.1.max(ready);
    }
    let mut out = Desired::new();
    for ((namespace, name), (port, local_endpoints)) in per_service {
        // Two Services naming the same port (nothing reserves health check ports across Services): the first by
        // namespace and name keeps it, the same on every node.
        out.entry(port).or_insert_with(|| Target {
            namespace: namespace.to_string(),
            name: name.to_string(),
            local_endpoints,
        });
    }
    out
}

/// kube-proxy's body, compact. Written out by hand: a serde map would sort the keys, and probes compare against
/// kube-proxy's order.
pub fn body(target: &Target, proxy_healthy: bool) -> String {
    format!(
        r#"{{"service":{{"namespace":{},"name":{}}},"localEndpoints":{},"serviceProxyHealthy":{}}}"#,
        serde_json::Value::from(target.namespace.as_str()),
        serde_json::Value::from(target.name.as_str()),
        target.local_endpoints,
        proxy_healthy,
    )
}

/// The whole HTTP/1.1 response. 200 only when the node has a local endpoint and the proxy is healthy (its changes
/// reach the kernel): a node whose rules are stale is no better for the load balancer than one without endpoints.
/// `head_only`: the answer to a HEAD request (the headers of a GET, no body).
pub fn response(target: &Target, proxy_healthy: bool, head_only: bool) -> Vec<u8> {
    let status = if target.local_endpoints > 0 && proxy_healthy { "200 OK" } else { "503 Service Unavailable" };
    let body = body(target, proxy_healthy);
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    out.into_bytes()
}

/// What the connections read at each request.
struct Shared {
    targets: Mutex<Desired>,
    proxy_healthy: Box<dyn Fn() -> bool + Send + Sync>,
}

/// The listeners, one task per port on the runtime; driven from any thread (the dataplane's) through
/// [`HealthCheckServer::update`].
pub struct HealthCheckServer {
    runtime: Handle,
    shared: Arc<Shared>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
    /// Desired ports that could not be bound, already logged: retried at every update, logged again only after
    /// they were bound once.
    failed: BTreeSet<u16>,
}

impl HealthCheckServer {
    /// A server with no port yet. `proxy_healthy` is asked at every request (kube-proxy's serviceProxyHealthy).
    pub fn new(runtime: Handle, proxy_healthy: impl Fn() -> bool + Send + Sync + 'static) -> HealthCheckServer {
        HealthCheckServer {
            runtime,
            shared: Arc::new(Shared { targets: Mutex::new(Desired::new()), proxy_healthy: Box::new(proxy_healthy) }),
            listeners: BTreeMap::new(),
            failed: BTreeSet::new(),
        }
    }

    /// Brings the listeners to `desired`: opens the new ports, closes the ones gone, and retries the ones that
    /// could not be bound before. Never fails: a port that cannot be bound is logged once and left for the next
    /// update, and the others are served meanwhile.
    pub fn update(&mut self, desired: Desired) {
        let ports: BTreeSet<u16> = desired.keys().copied().collect();
        // Counts first, so that a listener opened below answers with them at once.
        *self.shared.targets.lock().unwrap() = desired;
        self.listeners.retain(|&port, task| {
            // A listener whose task ended (it never should) is opened again below.
            let keep = ports.contains(&port) && !task.is_finished();
            if !keep {
                task.abort();
                info!(port, "closed a health check node port");
            }
            keep
        });
        self.failed.retain(|port| ports.contains(port));
        // Registering a socket with the runtime's reactor needs its context, which this thread does not have.
        let _runtime = self.runtime.enter();
        for port in ports {
            if self.listeners.contains_key(&port) {
                continue;
            }
            match listen(port) {
                Ok(listener) => {
                    let task = self.runtime.spawn(serve(listener, port, self.shared.clone()));
                    self.listeners.insert(port, task);
                    self.failed.remove(&port);
                    info!(port, "serving a health check node port");
                }
                Err(error) => {
                    if self.failed.insert(port) {
                        warn!(port, %error, "cannot listen on a health check node port; retrying");
                    }
                }
            }
        }
    }

    /// Whether some desired port is not bound (the caller retries even when nothing else changed).
    pub fn failing(&self) -> bool {
        !self.failed.is_empty()
    }

    /// The ports listened on now.
    pub fn serving(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

impl Drop for HealthCheckServer {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

/// A listener on every address of the node: one dual-stack socket (as Go's net.Listen opens for kube-proxy), or
/// IPv4 alone where IPv6 is unavailable or its socket cannot be bound.
fn listen(port: u16) -> io::Result<TcpListener> {
    match listen_dual_stack(port) {
        Ok(listener) => Ok(listener),
        Err(v6) => listen_v4(port).inspect_err(|_| debug!(port, error = %v6, "no dual-stack listener either")),
    }
}

fn listen_dual_stack(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v6()?;
    set_v6_only(&socket, false)?;
    // A restarted proxy binds again while the previous one's connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?;
    socket.listen(BACKLOG)
}

fn listen_v4(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    socket.listen(BACKLOG)
}

/// IPV6_V6ONLY, set explicitly rather than left to net.ipv6.bindv6only; tokio's TcpSocket has no setter for it.
fn set_v6_only(socket: &TcpSocket, on: bool) -> io::Result<()> {
    let value = libc::c_int::from(on);
    // SAFETY: the descriptor is the socket's own and open; the option is an int, passed with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&value as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Accepts until aborted (the port left the desired set), each connection answered on a task of its own.
async fn serve(listener: TcpListener, port: u16, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, port, shared.clone()));
            }
            Err(error) => {
                debug!(port, %error, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One request, one response, then close: whatever the method and path, as kube-proxy's handler answers.
async fn answer(mut stream: TcpStream, port: u16, shared: Arc<Shared>) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        // A probe that only connects, a client too slow or a head too long: nothing to answer.
        _ => return,
    };
    let target = shared.targets.lock().unwrap().get(&port).cloned();
    // The port left the desired set meanwhile: close, as the closed port would have.
    let Some(target) = target else { return };
    let reply = response(&target, (shared.proxy_healthy)(), head.starts_with(b"HEAD "));
    if let Ok(Ok(())) = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&reply)).await {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.shutdown()).await;
    }
}

/// The request head, up to its blank line. None when the peer closed first or the head exceeds [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
        // Bare LFs as well: HTTP/1.1 asks servers to accept them.
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proxy_state::{Endpoint, Proto};

    use super::*;

    fn target(local_endpoints: usize) -> Target {
        Target { namespace: "default".into(), name: "web-lb".into(), local_endpoints }
    }

    fn ep(ip: &str, local: bool, ready: bool) -> Endpoint {
        Endpoint { ip: ip.parse().unwrap(), port: 8080, local, ready, serving: true, terminating: !ready }
    }

    fn port(id: &str, hc: Option<u16>, endpoints: Vec<Endpoint>) -> ServicePort {
        let vip: IpAddr = "10.96.0.9".parse().unwrap();
        let policies = (true, false);
        let mut sp = ServicePort::new(id.into(), Proto::Tcp, vip, 80, Some(30085), vec![], None, policies, endpoints);
        sp.health_check_node_port = hc;
        sp
    }

    #[test]
    fn the_response_is_kube_proxys() {
        let ok = String::from_utf8(response(&target(2), true, false)).unwrap();
        assert_eq!(
            ok,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
             Content-Length: 97\r\nConnection: close\r\n\r\n\
             {\"service\":{\"namespace\":\"default\",\"name\":\"web-lb\"},\
             \"localEndpoints\":2,\"serviceProxyHealthy\":true}"
        );
        let none = String::from_utf8(response(&target(0), true, false)).unwrap();
        assert!(none.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{none}");
        assert!(none.ends_with("\"localEndpoints\":0,\"serviceProxyHealthy\":true}"), "{none}");
        let stale = String::from_utf8(response(&target(1), false, false)).unwrap();
        assert!(stale.starts_with("HTTP/1.1 503 ") && stale.ends_with("\"serviceProxyHealthy\":false}"), "{stale}");
        let head = String::from_utf8(response(&target(1), true, true)).unwrap();
        assert!(head.ends_with("Content-Length: 97\r\nConnection: close\r\n\r\n"), "{head}");
    }

    #[test]
    fn names_are_json_strings() {
        let t = Target { namespace: "a\"b".into(), name: "c\\d".into(), local_endpoints: 0 };
        let v: serde_json::Value = serde_json::from_str(&body(&t, true)).unwrap();
        assert_eq!(v["service"]["namespace"], "a\"b");
        assert_eq!(v["service"]["name"], "c\\d");
    }

    #[test]
    fn one_port_per_service_with_its_most_ready_local_endpoints() {
        let services = vec![
            port("d/lb:a/tcp", Some(30086), vec![ep("10.244.1.2", true, true), ep("10.244.2.2", false, true)]),
            port("d/lb:b/tcp", Some(30086), vec![ep("10.244.1.2", true, true), ep("10.244.1.3", true, true)]),
            // Terminating local endpoints serve Local traffic while nothing is ready, but do not count.
            port("d/draining:/tcp", Some(30090), vec![ep("10.244.1.4", true, false)]),
            port("d/plain:/tcp", None, vec![ep("10.244.1.5", true, true)]),
        ];
        assert_eq!(services[2].local.len(), 1, "the terminating endpoint is in use");
        let d = desired(&services);
        assert_eq!(d.keys().copied().collect::<Vec<_>>(), [30086, 30090]);
        assert_eq!(d[&30086], Target { namespace: "d".into(), name: "lb".into(), local_endpoints: 2 });
        assert_eq!(d[&30090].local_endpoints, 0);
        // Two Services on one port: the same winner whatever the order.
        let mut clash = vec![port("e/z:/tcp", Some(30091), vec![]), port("e/a:/tcp", Some(30091), vec![])];
        assert_eq!(desired(&clash)[&30091].name, "a");
        clash.reverse();
        assert_eq!(desired(&clash)[&30091].name, "a");
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        sock.read_to_string(&mut out).await.unwrap();
        out
    }

    const GET: &str = "GET / HTTP/1.1\r\nHost: node\r\nUser-Agent: probe\r\n\r\n";

    #[tokio::test]
    async fn a_listener_answers_with_the_count_of_the_moment() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            targets: Mutex::new(Desired::from([(addr.port(), target(1))])),
            proxy_healthy: Box::new(|| true),
        });
        let task = tokio::spawn(serve(listener, addr.port(), shared.clone()));
        let ok = get(addr, GET).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\"localEndpoints\":1,\"serviceProxyHealthy\":true}"), "{ok}");
        shared.targets.lock().unwrap().insert(addr.port(), target(0));
        let gone = get(addr, "GET /healthz HTTP/1.0\n\n").await;
        assert!(gone.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{gone}");
        assert!(gone.contains("\"localEndpoints\":0"), "{gone}");
        // A request that never ends its head is closed unanswered once it is too long.
        let long = format!("GET / HTTP/1.1\r\nX: {}", "x".repeat(2 * MAX_HEAD));
        let mut sock = TcpStream::connect(addr).await.unwrap();
        let _ = sock.write_all(long.as_bytes()).await;
        let mut out = Vec::new();
        let _ = sock.read_to_end(&mut out).await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        task.abort();
    }

    #[tokio::test]
    async fn update_opens_new_ports_closes_old_ones_and_retries_taken_ones() {
        let mut server = HealthCheckServer::new(Handle::current(), || true);
        // Two ports the kernel picked: one freed again (another process could take it meanwhile; the test takes
        // its chances), one held by this test as someone else's listener would be.
        let first = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let blocker = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let (open, taken) = (first.local_addr().unwrap().port(), blocker.local_addr().unwrap().port());
        drop(first);
        server.update(Desired::from([(open, target(1)), (taken, target(1))]));
        assert_eq!(server.serving(), [open]);
        assert!(server.failing(), "the taken port waits for the next update");
        let at = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        assert!(get(at(open), GET).await.starts_with("HTTP/1.1 200 OK\r\n"));
        // The count changes in place; the taken port is bound once it is free.
        drop(blocker);
        server.update(Desired::from([(open, target(0)), (taken, target(3))]));
        assert!(!server.failing());
        assert_eq!(server.serving(), [open.min(taken), open.max(taken)]);
        assert!(get(at(open), GET).await.starts_with("HTTP/1.1 503 "));
        assert!(get(at(taken), GET).await.contains("\"localEndpoints\":3"));
        server.update(Desired::from([(taken, target(3))]));
        assert_eq!(server.serving(), [taken]);
        let mut closed = false;
        for _ in 0..100 {
            if TcpStream::connect(at(open)).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "the port left the desired set and was closed");
    }
}
