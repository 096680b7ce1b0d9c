//! The agent's life: find the external interface, wait for a valid network config, acquire the lease, program
//! the backend and the rules, publish subnet.env, then keep everything true: renew the lease, follow the other
//! leases through a watch, resync the kernel state and the rules periodically. A normal stop removes nothing, so a
//! restart does not interrupt pod traffic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flannel::{LeaseAttrs, LeaseKey, NetworkConfig, SubnetEnv};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::acquire::{choose, Choice};
use crate::dataplane::{Dataplane, Report};
use crate::metrics::Shared;
use crate::options::Options;
use crate::registry::{Leases, Registry, Tls};
use tracing::{debug, error, info, warn};

/// Commands for the dataplane thread.
enum Cmd {
    Apply {
        own: LeaseKey,
        leases: Leases,
        reply: Option<mpsc::Sender<Result<Report>>>,
    },
    /// Something was deleted in the kernel: check now rather than at the next periodic resync.
    Drift,
    /// The network config changed the backend: carry on with this dataplane, and delete the old one's devices that
    /// the new one does not use (their routes, neighbours and FDB entries go with them).
    Replace(Box<Dataplane>),
}

/// Watches the kernel for deleted links, neighbours and routes (someone removing ours by hand, a device going
/// away) and nudges the dataplane thread. Our own removals nudge it too; the reconcile that follows finds nothing
/// to do, so this settles at once.
fn spawn_monitor(tx: mpsc::Sender<Cmd>) {
    let Ok(mut mon) =
        rtnl::Monitor::new(&[rtnl::GROUP_LINK, rtnl::GROUP_NEIGH, rtnl::GROUP_IPV4_ROUTE, rtnl::GROUP_IPV6_ROUTE])
    else {
        warn!("cannot watch netlink events; relying on the periodic resync");
        return;
    };
    let _ = std::thread::Builder::new().name("netlink-monitor".into()).spawn(move || loop {
        let Ok(msgs) = mon.next() else { return };
        use rtnl::packet::RouteNetlinkMessage as M;
        let deleted =
            msgs.is_empty() || msgs.iter().any(|m| matches!(m, M::DelLink(_) | M::DelRoute(_) | M::DelNeighbour(_)));
        if deleted && tx.send(Cmd::Drift).is_err() {
            return;
        }
    });
}

/// The dataplane thread: applies every new lease set, and re-applies the last one every `resync` to repair drift.
fn spawn_dataplane(mut dp: Dataplane, resync: Duration, health: Shared) -> mpsc::Sender<Cmd> {
    let (tx, rx) = mpsc::channel::<Cmd>();
    let watched = health.clone();
    std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dataplane_loop(&mut dp, &rx, resync, &health)
            }));
            // The loop ends only with a panic or when every sender is gone. Either way this process must not carry
            // on with nobody keeping routes true: /healthz fails, and the process exits non-zero so that its
            // supervisor (a DaemonSet) restarts it. The kernel keeps what it holds meanwhile.
            if let Ok(mut h) = watched.health.lock() {
                h.dataplane_dead = true;
            }
            error!(cause = if ran.is_err() { "panic" } else { "closed" }, "the dataplane thread stopped; exiting");
            std::process::exit(1);
        })
        .expect("spawn dataplane thread");
    spawn_monitor(tx.clone());
    tx
}

fn dataplane_loop(dp: &mut Dataplane, rx: &mpsc::Receiver<Cmd>, resync: Duration, status: &Shared) {
    let mut last: Option<(LeaseKey, Leases)> = None;
    let mut retire: Vec<String> = Vec::new();
    loop {
        let cmd = match rx.recv_timeout(resync) {
            Ok(c) => Some(c),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let cmd = match cmd {
            Some(Cmd::Drift) => {
                // Coalesce a burst of notifications into one reconcile.
                std::thread::sleep(Duration::from_millis(20));
                skip_drift(rx)
            }
            other => other,
        };
        // What a resync (periodic or after a netlink deletion) finds to write is drift, repaired.
        let resync = matches!(cmd, None | Some(Cmd::Drift));
        let reply = match cmd {
            Some(Cmd::Apply { own, leases, reply }) => {
                status.leases_seen.set(leases.len() as i64);
                last = Some((own, leases));
                reply
            }
            Some(Cmd::Replace(new)) => {
                let old = dp.devices();
                *dp = *new;
                let kept = dp.devices();
                // Deleted only after the new dataplane's routes replaced theirs (below), so that no subnet is
                // without a route in between.
                retire = old.into_iter().filter(|n| !kept.contains(n)).collect();
                None
            }
            Some(Cmd::Drift) | None => None,
        };
        let Some((own, leases)) = &last else { continue };
        let started = std::time::Instant::now();
        let res = dp.ensure_device(own).and_then(|c| {
            let mut r = dp.reconcile(own, leases)?;
            r.count("device", c);
            Ok(r)
        });
        let took = started.elapsed();
        for name in std::mem::take(&mut retire) {
            match dp.delete_device(&name) {
                Ok(_) => info!(device = %name, "removed: the backend changed"),
                Err(e) => warn!(device = %name, error = format!("{e:#}"), "removing an old device"),
            }
        }
        match &res {
            Ok(r) => {
                status.reconciled(took);
                status.routes.set(r.routes as i64);
                status.neighbours.set(r.neighbours as i64);
                status.fdb_entries.set(r.fdb as i64);
                for (kind, n) in &r.by_kind {
                    status.wrote(kind, *n);
                    if resync {
                        status.repaired(kind, *n);
                        warn!(kind = *kind, objects = *n, lease = %own, "repaired drift in the kernel");
                    }
                }
                if r.changes > 0 {
                    debug!(lease = %own, leases = leases.len(), changes = r.changes, took_ms = took.as_millis() as u64, "reconciled");
                }
                let mut h = status.health.lock().unwrap();
                let now: Vec<String> =
                    r.unreachable.iter().map(|(k, ip)| format!("{k} via {ip} is not on this L2 segment")).collect();
                // Said once per change, not every resync.
                if now != h.unreachable {
                    for (k, ip) in r.unreachable.iter() {
                        if !h.unreachable.iter().any(|u| u.starts_with(&format!("{k} via {ip} "))) {
                            warn!(lease = %k, public_ip = %ip, "host-gw: the public IP is not on this L2 segment; not routed");
                        }
                    }
                    h.unreachable = now;
                }
            }
            Err(e) => {
                status.reconcile_errors.inc();
                status.lagging();
                status.health.lock().unwrap().last_error = Some(format!("{e:#}"));
                error!(lease = %own, error = format!("{e:#}"), "reconcile failed");
            }
        }
        if let Some(r) = reply {
            let _ = r.send(res);
        }
    }
}

/// Takes the queued drift notifications and returns the first other command, if one is queued behind them. (An
/// Apply queued behind a burst of notifications must not be dropped with them: its caller waits for the reply.)
fn skip_drift(rx: &mpsc::Receiver<Cmd>) -> Option<Cmd> {
    loop {
        match rx.try_recv() {
            Ok(Cmd::Drift) => continue,
            Ok(other) => return Some(other),
            Err(_) => return None,
        }
    }
}

fn apply(tx: &mpsc::Sender<Cmd>, own: LeaseKey, leases: &Leases) -> Result<Report> {
    // Synchronous: its caller sees the result, and the probes see the reconcile's own outcome.
    let (rtx, rrx) = mpsc::channel();
    tx.send(Cmd::Apply { own, leases: leases.clone(), reply: Some(rtx) }).context("dataplane thread gone")?;
    rrx.recv().context("dataplane thread gone")?
}

async fn connect(opts: &Options, tls: Option<&Tls>, status: &Shared) -> Registry {
    let mut delay = Duration::from_millis(200);
    loop {
        match Registry::connect(&opts.etcd_endpoints, &opts.etcd_prefix, tls).await {
            Ok(r) => return r,
            Err(e) => {
                status.etcd_error("connect");
                warn!(error = format!("{e:#}"), retry_in = ?delay, "connecting to etcd");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// `--net-config-path`: the file's config goes to the store if the store has none (the first node to start puts it;
/// the others find it there). Retried while etcd fails.
async fn seed_config(
    reg: &mut Registry,
    opts: &Options,
    path: &std::path::Path,
    text: &str,
    file_cfg: &NetworkConfig,
    status: &Shared,
) {
    let key = format!("{}/config", opts.etcd_prefix.trim_end_matches('/'));
    let mut delay = Duration::from_millis(200);
    loop {
        match reg.seed_config(text.trim()).await {
            Ok(None) => {
                info!(%key, file = %path.display(), "network config put in the store");
                return;
            }
            Ok(Some(old)) => {
                if NetworkConfig::parse(&old).ok().as_ref() != Some(file_cfg) {
                    warn!(%key, file = %path.display(), "the store holds another network config: the store's is in force");
                }
                return;
            }
            Err(e) => {
                status.etcd_error("config");
                warn!(error = format!("{e:#}"), retry_in = ?delay, "putting the network config");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Waits for `<prefix>/config` to hold a valid config, saying precisely what is wrong meanwhile.
async fn wait_config(reg: &mut Registry, opts: &Options, status: &Shared) -> NetworkConfig {
    let mut last_msg = String::new();
    loop {
        let msg = match reg.config().await {
            Ok(Some(text)) => match NetworkConfig::parse_with_warnings(&text) {
                Ok((c, warnings)) => {
                    // Said once: a misspelt option must be visible, as flanneld's silence is not.
                    for w in warnings {
                        warn!(key = format!("{}/config", opts.etcd_prefix), "network config: {w}");
                    }
                    return c;
                }
                Err(e) => format!("{e} (at {}/config); waiting for a valid one", opts.etcd_prefix),
            },
            Ok(None) => format!("no network config at {}/config yet; waiting", opts.etcd_prefix),
            Err(e) => {
                status.etcd_error("config");
                format!("reading the network config: {e:#}")
            }
        };
        if msg != last_msg {
            warn!("{msg}");
            status.health.lock().unwrap().last_error = Some(msg.clone());
            last_msg = msg;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// flanneld's acquire: up to 10 attempts against races; an exhausted pool is reported and retried.
async fn acquire(
    reg: &mut Registry,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseKey>,
    ttl: u64,
    status: &Shared,
) -> Result<LeaseKey> {
    let mut failures = 0;
    loop {
        // etcd errors (after the client's own retries on every member) are waited out, never fatal: a node
        // that cannot reach etcd at start keeps trying, as flanneld does.
        let attempt = async {
            for _ in 0..10 {
                let (leases, _) = reg.leases().await?;
                let choice = choose(cfg, &leases, attrs.public_ip, previous, &mut rand::rng());
                match choice {
                    Choice::Reuse(k) => {
                        reg.renew(&k, attrs, ttl).await?;
                        return Ok(Some(k));
                    }
                    Choice::Take(k) => {
                        if reg.create(&k, attrs, ttl).await? {
                            return Ok(Some(k));
                        }
                        // Another node took it between our listing and our transaction: list again.
                    }
                    Choice::Exhausted => return Ok(None),
                }
            }
            Ok::<_, anyhow::Error>(None)
        };
        let wait = match attempt.await {
            Ok(Some(k)) => return Ok(k),
            Ok(None) => {
                warn!(
                    subnet_min = %cfg.subnet_min,
                    subnet_max = %cfg.subnet_max,
                    subnet_len = cfg.subnet_len,
                    "no free subnet: every one is leased; retrying"
                );
                Duration::from_secs(5)
            }
            Err(e) => {
                failures += 1;
                let wait = store::backoff(failures, Duration::from_secs(5));
                status.etcd_error("acquire");
                warn!(error = format!("{e:#}"), retry_in = ?wait, "acquiring a lease");
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Every lease and the revision of the listing, retried until etcd answers.
async fn list_leases(reg: &mut Registry, status: &Shared) -> (Leases, i64) {
    let mut failures = 0;
    loop {
        match reg.leases().await {
            Ok(l) => return l,
            Err(e) => {
                failures += 1;
                let wait = store::backoff(failures, Duration::from_secs(5));
                status.etcd_error("list");
                warn!(error = format!("{e:#}"), retry_in = ?wait, "listing leases");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

pub async fn run(opts: Options, health: Shared) -> Result<()> {
    let mut rt = rtnl::Rtnl::new()?;
    let ext = crate::external::find(&mut rt, &opts)?;
    drop(rt);
    info!(iface = %ext.name, ip = %ext.ip, public_ip = %ext.public_ip, "using interface");

    let tls =
        Tls::from_files(opts.etcd_cafile.as_deref(), opts.etcd_certfile.as_deref(), opts.etcd_keyfile.as_deref())?;
    // A config file that cannot be read or parsed stops the start before anything is done.
    let file_config = match &opts.net_config_path {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("--net-config-path {}", path.display()))?;
            let cfg = NetworkConfig::parse(&text).with_context(|| format!("--net-config-path {}", path.display()))?;
            Some((path.clone(), text, cfg))
        }
        None => None,
    };
    let mut reg = connect(&opts, tls.as_ref(), &health).await;
    if let Some((path, text, cfg)) = &file_config {
        seed_config(&mut reg, &opts, path, text, cfg, &health).await;
    }
    let mut cfg = wait_config(&mut reg, &opts, &health).await;
    let mut network =
        cfg.network.context("EnableIPv4 is false: IPv6-only networks are not supported (dual stack is)")?;
    let network6 = if cfg.enable_ipv6 { cfg.ipv6_network } else { None };
    let dp = Dataplane::new(ext.clone(), cfg.backend.clone(), network, network6, &opts.state_dir)?;
    let mut mtu = dp.mtu();
    let mut attrs = LeaseAttrs {
        public_ip: ext.public_ip,
        // flanneld writes null here unless the network is dual stack.
        public_ipv6: network6.and(ext.public_ipv6),
        backend_type: cfg.backend.kind.as_str().to_string(),
        backend_data: dp.backend_data(),
        backend_v6_data: dp.backend_v6_data(),
    };
    let previous = SubnetEnv::load(&opts.subnet_file).ok().and_then(|e| match (e.subnet, e.ipv6_subnet) {
        (Some(IpNet::V4(s)), v6) => Some(LeaseKey {
            subnet: s.trunc(),
            ipv6_subnet: match v6 {
                Some(IpNet::V6(s6)) => Some(s6.trunc()),
                _ => None,
            },
        }),
        _ => None,
    });
    let mut own = acquire(&mut reg, &cfg, &attrs, previous, opts.lease_ttl, &health).await?;
    info!(lease = %own, backend = cfg.backend.kind.as_str(), "acquired lease");
    health.health.lock().unwrap().lease = Some(own.to_string());
    health.leases_held.set(1);

    let dp_tx = spawn_dataplane(dp, Duration::from_secs(opts.route_resync.max(1)), health.clone());
    let (mut leases, _) = list_leases(&mut reg, &health).await;
    // udp: the TUN device and the userspace loop, fed the remote subnets as leases change.
    let udp_routes: Option<crate::udp::Routes> = if cfg.backend.kind == flannel::BackendType::Udp {
        let fd = crate::udp::setup(own.subnet, network, mtu).context("setting up flannel0")?;
        let routes = std::sync::Arc::new(std::sync::RwLock::new(crate::udp::routes_of(&own.subnet, &leases)));
        let (r, port) = (routes.clone(), cfg.backend.port);
        tokio::spawn(async move {
            if let Err(e) = crate::udp::run(fd, port, r).await {
                error!(error = format!("{e:#}"), "udp backend stopped; exiting");
                std::process::exit(1);
            }
        });
        Some(routes)
    } else {
        None
    };
    let update_udp = |own: &LeaseKey, leases: &Leases| {
        if let Some(r) = &udp_routes {
            *r.write().unwrap() = crate::udp::routes_of(&own.subnet, leases);
        }
    };
    apply(&dp_tx, own, &leases)?;
    // (network, this node's subnet) per family; shared with the rules' resync, which follows config changes.
    let families = Arc::new(Mutex::new(families_of(network, network6, &own)));
    for (n, s) in families.lock().unwrap().iter() {
        crate::rules::sync(*n, *s, opts.ip_masq).context("installing the FLANNEL-* rules")?;
    }

    // Only now, with routes and rules in place, may pods be wired.
    write_subnet_env(&opts, network, network6, &own, mtu)?;
    health.subnet_env_writes.inc();
    {
        let mut h = health.health.lock().unwrap();
        h.ready = true;
        h.last_error = None;
    }
    info!(path = %opts.subnet_file.display(), lease = %own, mtu, "wrote subnet.env; ready");

    // The cluster store: this Node, and the status of the pods wired here.
    let publisher = crate::publish::Publisher {
        node: opts.node_name.clone().unwrap_or_else(hostname),
        public_ip: IpAddr::V4(ext.public_ip),
        public_ipv6: attrs.public_ipv6.map(IpAddr::V6),
        pod_cidrs: families.lock().unwrap().iter().map(|(_, s)| s.to_string()).collect(),
        run_dir: opts.run_dir.clone(),
    };
    let (store_eps, store_prefix, store_tls) = (opts.etcd_endpoints.clone(), opts.store_prefix.clone(), tls.clone());
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        let store = loop {
            match store::Store::connect(&store_eps, &store_prefix, store_tls.as_ref()).await {
                Ok(s) => break s,
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "connecting to the cluster store");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        publisher.run(store).await
    });

    // The rules: resynced every --iptables-resync seconds (someone may flush them).
    let resync = Duration::from_secs(opts.iptables_resync.max(1));
    let masq = opts.ip_masq;
    let resync_families = families.clone();
    let rules_status = health.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(resync).await;
            let fams = resync_families.lock().unwrap().clone();
            let r = tokio::task::spawn_blocking(move || {
                fams.iter().try_fold(0, |n, (net, s)| {
                    Ok::<_, iptables::IptablesError>(n + crate::rules::sync(*net, *s, masq)?)
                })
            })
            .await;
            match r {
                Ok(Ok(0)) | Err(_) => {}
                Ok(Ok(n)) => {
                    rules_status.wrote("rules", n);
                    rules_status.repaired("rules", n);
                    warn!(jumps = n, "the FLANNEL-* rules were gone; reinstalled");
                }
                Ok(Err(e)) => warn!(error = %e, "iptables resync"),
            }
        }
    });

    // Renewal: at expiry minus the margin; a failure is retried every minute (sooner with short test TTLs).
    let ttl = opts.lease_ttl;
    let margin = opts.subnet_lease_renew_margin * 60;
    let renew_after = Duration::from_secs(if margin < ttl { ttl - margin } else { (ttl / 2).max(1) });
    let retry = Duration::from_secs((ttl / 10).clamp(1, 60));
    let (endpoints, prefix) = (opts.etcd_endpoints.clone(), opts.etcd_prefix.clone());
    // The lease renewed: ours, as config changes leave it.
    let lease = Arc::new(Mutex::new((own, attrs.clone())));
    let renew_lease = lease.clone();
    let renew_tls = tls.clone();
    let renew_status = health.clone();
    tokio::spawn(async move {
        let mut wait = renew_after;
        let mut failing = false;
        loop {
            tokio::time::sleep(wait).await;
            let (own, renew_attrs) = renew_lease.lock().unwrap().clone();
            let res = async {
                let mut r = Registry::connect(&endpoints, &prefix, renew_tls.as_ref()).await?;
                r.renew(&own, &renew_attrs, ttl).await
            }
            .await;
            wait = match res {
                Ok(()) => {
                    renew_status.lease_renewals.inc();
                    if std::mem::take(&mut failing) {
                        info!(lease = %own, "renewed lease after failed attempts");
                    } else {
                        debug!(lease = %own, ttl, "renewed lease");
                    }
                    renew_after
                }
                Err(e) => {
                    failing = true;
                    renew_status.etcd_error("renew");
                    warn!(lease = %own, error = format!("{e:#}"), retry_in = ?retry, "lease renewal failed");
                    retry
                }
            };
        }
    });

    // Follow the config and the other leases, with the store's one list+watch loop: it reconnects to whichever
    // etcd member answers and re-lists after a compaction; a listing replaces what we had.
    let config_key = format!("{}/config", opts.etcd_prefix.trim_end_matches('/'));
    let mut follower = store::Follower::new(
        &opts.etcd_endpoints,
        &format!("{}/", opts.etcd_prefix.trim_end_matches('/')),
        tls.clone(),
    );
    loop {
        let mut changed = false;
        let update = follower.next().await;
        // The config first: a changed backend or network is reconciled before the leases are applied.
        let new_config = match &update {
            store::Raw::Reset(kvs) => kvs.iter().find(|kv| kv.key == config_key).map(|kv| kv.value.clone()),
            store::Raw::Events(evs) => evs.iter().rev().find_map(|ev| match ev {
                store::RawEvent::Put(kv) if kv.key == config_key => Some(kv.value.clone()),
                _ => None,
            }),
            store::Raw::Unavailable { .. } => None,
        };
        if let Some(text) = new_config {
            let mut live = Live {
                cfg: &mut cfg,
                network: &mut network,
                network6,
                own: &mut own,
                attrs: &mut attrs,
                mtu: &mut mtu,
            };
            if live.change(&String::from_utf8_lossy(&text), &opts, &ext, &mut reg, &dp_tx, &health).await? {
                *lease.lock().unwrap() = (own, attrs.clone());
                *families.lock().unwrap() = families_of(network, network6, &own);
                health.health.lock().unwrap().lease = Some(own.to_string());
                // A lease we left behind is no remote node's.
                leases.retain(|k, a| *k == own || a.public_ip != attrs.public_ip);
                leases.insert(own, attrs.clone());
                changed = true;
            }
        }
        match update {
            store::Raw::Reset(kvs) => {
                let mut listed: Leases = kvs.iter().filter_map(|kv| reg.parse(kv.key.as_bytes(), &kv.value)).collect();
                match listed.get(&own) {
                    Some(a) if a.public_ip != attrs.public_ip => {
                        bail!("lease {own} has been revoked: node {} holds the subnet now; exiting", a.public_ip)
                    }
                    Some(_) => {}
                    None => {
                        // Expired or deleted while we were not watching.
                        lease_revoked(&mut reg, &own, &attrs, opts.lease_ttl).await?;
                        listed.insert(own, attrs.clone());
                    }
                }
                changed = listed != leases;
                leases = listed;
            }
            store::Raw::Events(events) => {
                for ev in events {
                    match ev {
                        store::RawEvent::Put(kv) => {
                            let Some((k, a)) = reg.parse(kv.key.as_bytes(), &kv.value) else { continue };
                            if k == own && a.public_ip != attrs.public_ip {
                                bail!(
                                    "lease {own} has been revoked: node {} holds the subnet now; exiting",
                                    a.public_ip
                                );
                            }
                            changed |= leases.get(&k) != Some(&a);
                            leases.insert(k, a);
                        }
                        store::RawEvent::Delete(key) => {
                            let prefix = reg.subnets_prefix();
                            let Some(k) = key.strip_prefix(&prefix).and_then(|s| s.parse::<LeaseKey>().ok()) else {
                                continue;
                            };
                            changed |= leases.remove(&k).is_some();
                            if k == own {
                                lease_revoked(&mut reg, &own, &attrs, opts.lease_ttl).await?;
                                leases.insert(own, attrs.clone());
                            }
                        }
                    }
                }
            }
            store::Raw::Unavailable { error, retry_in } => {
                health.etcd_error("follow");
                warn!(%error, ?retry_in, "following leases; routes stay as they are");
            }
        }
        if changed {
            update_udp(&own, &leases);
            health.lagging();
            let _ = dp_tx.send(Cmd::Apply { own, leases: leases.clone(), reply: None });
        }
    }
}

/// (network, this node's subnet) per family.
fn families_of(network: Ipv4Net, network6: Option<Ipv6Net>, own: &LeaseKey) -> Vec<(IpNet, IpNet)> {
    let mut v = vec![(IpNet::V4(network), IpNet::V4(own.subnet))];
    if let (Some(n6), Some(s6)) = (network6, own.ipv6_subnet) {
        v.push((IpNet::V6(n6), IpNet::V6(s6)));
    }
    v
}

/// subnet.env (and Docker's options, when asked for) for `own`: the first address of each subnet is the gateway.
fn write_subnet_env(
    opts: &Options,
    network: Ipv4Net,
    network6: Option<Ipv6Net>,
    own: &LeaseKey,
    mtu: u32,
) -> Result<()> {
    let first = |s: IpNet| -> Result<IpNet> {
        let addr = match s.network() {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + 1)),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) + 1)),
        };
        Ok(IpNet::new(addr, s.prefix_len())?)
    };
    let env = SubnetEnv {
        network: Some(IpNet::V4(network)),
        subnet: Some(first(IpNet::V4(own.subnet))?),
        ipv6_network: network6.map(IpNet::V6),
        ipv6_subnet: own.ipv6_subnet.map(|s| first(IpNet::V6(s))).transpose()?,
        mtu: Some(mtu),
        ipmasq: Some(opts.ip_masq),
    };
    env.write_atomic(&opts.subnet_file).with_context(|| format!("writing {}", opts.subnet_file.display()))?;
    if let Some(path) = &opts.docker_opts_file {
        atomic_file::write(path, env.docker_opts().as_bytes())
            .with_context(|| format!("writing Docker's options to {}", path.display()))?;
    }
    Ok(())
}

/// What changed between two configs, for the log.
fn describe_change(old: &NetworkConfig, new: &NetworkConfig) -> String {
    let mut v = Vec::new();
    let mut diff = |what: &str, a: String, b: String| {
        if a != b {
            v.push(format!("{what} {a} -> {b}"));
        }
    };
    diff("Network", format!("{:?}", old.network), format!("{:?}", new.network));
    diff("SubnetLen", old.subnet_len.to_string(), new.subnet_len.to_string());
    diff("SubnetMin", old.subnet_min.to_string(), new.subnet_min.to_string());
    diff("SubnetMax", old.subnet_max.to_string(), new.subnet_max.to_string());
    diff("Backend.Type", old.backend.kind.as_str().into(), new.backend.kind.as_str().into());
    diff("Backend.VNI", old.backend.vni.to_string(), new.backend.vni.to_string());
    diff("Backend.Port", old.backend.port.to_string(), new.backend.port.to_string());
    diff("Backend.DirectRouting", old.backend.direct_routing.to_string(), new.backend.direct_routing.to_string());
    diff("Backend.MTU", format!("{:?}", old.backend.mtu), format!("{:?}", new.backend.mtu));
    if v.is_empty() {
        "no field Tartan uses".into()
    } else {
        v.join(", ")
    }
}

/// The parts of the agent's state a config change can move. flanneld reads its config once and needs a restart
/// for a new one (which re-creates its device and may move its lease); Tartan reconciles in place instead: a new
/// backend is a new dataplane that replaces routes one by one (`ip route replace`) before the old device is
/// deleted, so subnets that did not change keep a route throughout; a new network moves the lease.
struct Live<'a> {
    cfg: &'a mut NetworkConfig,
    network: &'a mut Ipv4Net,
    network6: Option<Ipv6Net>,
    own: &'a mut LeaseKey,
    attrs: &'a mut LeaseAttrs,
    mtu: &'a mut u32,
}

impl Live<'_> {
    /// Applies the config `text` if it differs from the one in force. Ok(true): something changed.
    async fn change(
        &mut self,
        text: &str,
        opts: &Options,
        ext: &crate::external::External,
        reg: &mut Registry,
        dp_tx: &mpsc::Sender<Cmd>,
        status: &Shared,
    ) -> Result<bool> {
        let keep = |why: String| {
            warn!(key = format!("{}/config", opts.etcd_prefix), reason = %why, "the network config changed; keeping the one in force");
            Ok(false)
        };
        let (new, warnings) = match NetworkConfig::parse_with_warnings(text) {
            Ok(c) => c,
            Err(e) => return keep(format!("the new one is invalid ({e})")),
        };
        if new == *self.cfg {
            return Ok(false);
        }
        let Some(new_network) = new.network else { return keep("IPv6-only networks are not supported".into()) };
        let new6 = if new.enable_ipv6 { new.ipv6_network } else { None };
        if new6 != self.network6 {
            return keep("EnableIPv6 and IPv6Network take a restart to change".into());
        }
        let udp = |c: &NetworkConfig| c.backend.kind == flannel::BackendType::Udp;
        if (udp(self.cfg) || udp(&new)) && new.backend != self.cfg.backend {
            return keep("changing to, from or within the udp backend takes a restart".into());
        }
        for w in warnings {
            warn!(key = format!("{}/config", opts.etcd_prefix), "network config: {w}");
        }
        info!(change = %describe_change(self.cfg, &new), "network config changed; reconciling");
        let fits = new.fits(&self.own.subnet);
        if !fits {
            // The old network's remote routes go first: the new dataplane only knows the new network.
            apply(dp_tx, *self.own, &Leases::new())?;
        }
        if new.backend != self.cfg.backend || !fits {
            let dp = Dataplane::new(ext.clone(), new.backend.clone(), new_network, new6, &opts.state_dir)?;
            *self.mtu = dp.mtu();
            self.attrs.backend_type = new.backend.kind.as_str().to_string();
            self.attrs.backend_data = dp.backend_data();
            self.attrs.backend_v6_data = dp.backend_v6_data();
            dp_tx.send(Cmd::Replace(Box::new(dp))).context("dataplane thread gone")?;
        }
        if fits {
            // Other nodes learn our new backend data from the lease.
            reg.renew(self.own, self.attrs, opts.lease_ttl).await?;
        } else {
            let old = *self.own;
            let moved = acquire(reg, &new, self.attrs, None, opts.lease_ttl, status).await?;
            reg.release(&old).await?;
            info!(released = %old, lease = %moved, "the network moved");
            *self.own = moved;
        }
        *self.network = new_network;
        *self.cfg = new;
        for (n, s) in families_of(*self.network, self.network6, self.own) {
            crate::rules::sync(n, s, opts.ip_masq).context("rewriting the FLANNEL-* rules")?;
        }
        write_subnet_env(opts, *self.network, self.network6, self.own, *self.mtu)?;
        status.subnet_env_writes.inc();
        Ok(true)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Our lease was deleted by someone else: take it back if the subnet is still free, else stop (flanneld's
/// "Lease has been revoked").
async fn lease_revoked(reg: &mut Registry, own: &LeaseKey, attrs: &LeaseAttrs, ttl: u64) -> Result<()> {
    warn!(lease = %own, "the lease has been revoked");
    if reg.create(own, attrs, ttl).await? {
        info!(lease = %own, "re-acquired lease");
        Ok(())
    } else {
        bail!("lease {own} has been revoked and another node holds the subnet now; exiting")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apply_behind_drift_notifications_is_kept() {
        let (tx, rx) = mpsc::channel();
        let (rtx, _rrx) = mpsc::channel();
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        tx.send(Cmd::Drift).unwrap();
        tx.send(Cmd::Drift).unwrap();
        tx.send(Cmd::Apply { own, leases: Leases::default(), reply: Some(rtx) }).unwrap();
        tx.send(Cmd::Drift).unwrap();
        assert!(matches!(skip_drift(&rx), Some(Cmd::Apply { reply: Some(_), .. })), "the Apply, not dropped");
        assert!(skip_drift(&rx).is_none(), "the drift after it is taken too");
    }
}
