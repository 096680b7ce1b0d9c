//! The commands.

use std::collections::BTreeSet;
use std::net::IpAddr;

use cni_types::{
    Attachment, CniError, CniResult, Command, ErrorCode, Interface, IpConfig, Request, Route, Version,
    SUPPORTED_VERSIONS,
};
use ipam::Store;
use ipnet::IpNet;
use netns::NetNs;
use rtnl::{RouteSpec, Rtnl};

use crate::config::{parse_raw, Ipam, Need, Plan};
use crate::error::{PluginError, Result};
use node_contract::pods;

use crate::{delegate, masq, net, Outcome};

/// The whole plugin: environment lookup and stdin in, what to print and the exit code out.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // Errors are shaped for the config's version when it can be read, the latest otherwise.
    let version = parse_raw(stdin).map(|(v, _)| v).unwrap_or(Version::LATEST);
    let fail = |e: CniError| Outcome { stdout: e.to_json(version), exit_code: 1 };
    let req = match Request::from_env(&env) {
        Ok(r) => r,
        Err(e) => return fail(e.into()),
    };
    if req.command == Command::Version {
        return version_doc(stdin);
    }
    let need = match req.command {
        Command::Del | Command::Gc => Need::OwnersOnly,
        _ => Need::Ranges,
    };
    let plan = match Plan::from_stdin(stdin, need) {
        Ok(p) => p,
        // STATUS answers "not available" where ADD would say "try again later".
        Err(e) if req.command == Command::Status && e.code == ErrorCode::TryAgainLater => {
            return fail(CniError::new(ErrorCode::NotAvailable, e.msg, e.details));
        }
        Err(e) => return fail(e),
    };
    if req.command == Command::Add {
        return match add(&req, &plan, stdin).and_then(|r| record_pod(&req, &plan, stdin, r)) {
            Ok(result) => {
                let doc = match &plan.prev_result {
                    Some(prev) => chain_onto(prev, &result, plan.version),
                    None => result.to_value(plan.version),
                };
                Outcome { stdout: doc.to_string(), exit_code: 0 }
            }
            Err(e) => fail(e.to_cni()),
        };
    }
    let done: Result<Option<CniResult>> = match req.command {
        Command::Add => unreachable!("answered above"),
        Command::Del => del(&req, &plan, stdin).map(|_| None),
        Command::Check => check(&req, &plan, stdin).map(|_| None),
        Command::Gc => gc(&req, &plan, stdin).map(|_| None),
        Command::Status => status(&plan).map(|_| None),
        Command::Version => unreachable!("answered above"),
    };
    match done {
        Ok(Some(result)) => Outcome { stdout: result.to_json(plan.version), exit_code: 0 },
        Ok(None) => Outcome { stdout: String::new(), exit_code: 0 },
        Err(e) => fail(e.to_cni()),
    }
}

fn version_doc(stdin: &[u8]) -> Outcome {
    let v = parse_raw(stdin).map(|(v, _)| v).unwrap_or(Version::LATEST);
    let doc = serde_json::json!({
        "cniVersion": v.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS.map(Version::as_str),
    });
    Outcome { stdout: doc.to_string(), exit_code: 0 }
}

/// An address for the container and the gateway that goes with it.
struct Addr {
    net: IpNet,
    gateway: Option<IpAddr>,
}

/// IPAM for ADD: in-process host-local, or the delegate. On failure nothing stays allocated.
fn ipam_add(req: &Request, plan: &Plan, stdin: &[u8]) -> Result<(Vec<Addr>, Vec<Route>, Option<cni_types::Dns>)> {
    match &plan.ipam {
        Ipam::HostLocal { sets, routes, data_dir } => {
            let mut requested = plan.requested_ips.clone();
            if let Some(ips) = req.args.get("IP") {
                for ip in ips.split(',').filter(|s| !s.is_empty()) {
                    requested.push(ip.parse().map_err(|_| {
                        PluginError::Cni(CniError::new(
                            ErrorCode::InvalidEnvironment,
                            format!("CNI_ARGS IP={ip} is not an address"),
                            "",
                        ))
                    })?);
                }
            }
            let store = Store::open(data_dir, &plan.network)?;
            let lock = store.lock()?;
            let got = (|| -> Result<Vec<ipam::Allocation>> {
                let mut got = Vec::new();
                for (index, set) in sets.iter().enumerate() {
                    match requested.iter().position(|ip| set.contains(*ip)) {
                        Some(pos) => got.push(lock.allocate_requested(
                            set,
                            requested.remove(pos),
                            &req.container_id,
                            &req.ifname,
                        )?),
                        None => got.push(lock.allocate_at(index, set, &req.container_id, &req.ifname)?),
                    }
                }
                if let Some(ip) = requested.first() {
                    return Err(PluginError::Ipam(ipam::IpamError::InvalidRange(format!(
                        "requested address {ip} is in none of the ranges"
                    ))));
                }
                Ok(got)
            })();
            let got = match got {
                Ok(g) => g,
                Err(e) => {
                    let _ = lock.release(&req.container_id, &req.ifname);
                    return Err(e);
                }
            };
            let addrs = got
                .iter()
                .map(|a| Addr {
                    net: IpNet::new(a.ip, a.range.subnet.prefix_len()).expect("prefix from a valid subnet"),
                    gateway: Some(a.range.gateway),
                })
                .collect();
            let routes = routes.iter().map(|r| Route::new(r.dst, r.gw)).collect();
            Ok((addrs, routes, None))
        }
        Ipam::Delegate { plugin } => {
            let r = delegate::exec(plugin, req, "ADD", stdin)?
                .ok_or_else(|| PluginError::Invalid(format!("ipam plugin {plugin} returned no result")))?;
            if r.ips.is_empty() {
                let _ = delegate::exec(plugin, req, "DEL", stdin);
                return Err(PluginError::Invalid(format!("ipam plugin {plugin} returned no IP addresses")));
            }
            let addrs = r.ips.iter().map(|i| Addr { net: i.address, gateway: i.gateway }).collect();
            Ok((addrs, r.routes, Some(r.dns)))
        }
    }
}

/// Releases what IPAM holds for the attachment; with host-local, drops the masquerade rules with the network's
/// last address.
fn ipam_del(req: &Request, plan: &Plan, stdin: &[u8]) -> Result<()> {
    match &plan.ipam {
        Ipam::HostLocal { data_dir, .. } => {
            let Some(store) = Store::existing(data_dir, &plan.network) else { return Ok(()) };
            let lock = store.lock()?;
            lock.release(&req.container_id, &req.ifname)?;
            // Whatever ipMasq says now (in flannel mode without subnet.env it cannot be known): rules of a network
            // with no address left have nothing to do. Rare (the last pod) and a no-op when there are none.
            if lock.taken()?.is_empty() {
                masq::remove(&plan.network, &plan.run_dir)?;
            }
            Ok(())
        }
        Ipam::Delegate { plugin } => delegate::exec(plugin, req, "DEL", stdin).map(|_| ()),
    }
}

fn add(req: &Request, plan: &Plan, stdin: &[u8]) -> Result<CniResult> {
    let netns_path = req.netns.as_ref().expect("ADD requires CNI_NETNS");
    let ns = NetNs::open(netns_path).map_err(|source| PluginError::Netns { path: netns_path.clone(), source })?;
    let mut host = Rtnl::new()?;
    let mut ctr = Rtnl::in_netns(&ns)?;
    // Checked before anything changes: an ADD for a live attachment must fail without touching it.
    if ctr.link_get(&req.ifname)?.is_some() {
        return Err(PluginError::InterfaceExists {
            ifname: req.ifname.clone(),
            netns: netns_path.display().to_string(),
        });
    }
    let (addrs, ipam_routes, ipam_dns) = ipam_add(req, plan, stdin)?;
    let host_name = node_contract::host_veth_name(&req.container_id, &req.ifname);
    let mut created_veth = false;
    let wired = wire(req, plan, &ns, &mut host, &mut ctr, &addrs, ipam_routes, &host_name, &mut created_veth);
    match wired {
        Ok(mut result) => {
            if let Some(dns) = ipam_dns.filter(|d| !d.is_empty()) {
                result.dns = dns;
            }
            Ok(result)
        }
        Err(e) => {
            // Leave nothing behind: the veth (both ends go with it) and the addresses.
            if created_veth {
                let _ = host.link_del_name(&host_name);
            }
            let _ = ipam_del(req, plan, stdin);
            Err(e)
        }
    }
}

/// In the middle of a chain, what earlier plugins reported is passed on untouched (fields we do not model
/// included) with ours appended, the interface indices of our addresses shifted past theirs.
fn chain_onto(prev: &serde_json::Value, ours: &CniResult, version: Version) -> serde_json::Value {
    let mut out = prev.clone();
    let ours = ours.to_value(version);
    let offset = prev.get("interfaces").and_then(|v| v.as_array()).map_or(0, Vec::len);
    let append = |out: &mut serde_json::Value, key: &str, items: Vec<serde_json::Value>| {
        if items.is_empty() {
            return;
        }
        let slot = out.as_object_mut().expect("prevResult is an object").entry(key).or_insert(serde_json::json!([]));
        if let Some(a) = slot.as_array_mut() {
            a.extend(items);
        }
    };
    let list = |k: &str| ours.get(k).and_then(|v| v.as_array()).cloned().unwrap_or_default();
    append(&mut out, "interfaces", list("interfaces"));
    let ips = list("ips")
        .into_iter()
        .map(|mut ip| {
            if let Some(i) = ip.get("interface").and_then(|i| i.as_u64()) {
                ip["interface"] = serde_json::json!(i as usize + offset);
            }
            ip
        })
        .collect();
    append(&mut out, "ips", ips);
    append(&mut out, "routes", list("routes"));
    if let Some(dns) = ours.get("dns") {
        out["dns"] = dns.clone();
    }
    out["cniVersion"] = serde_json::json!(version.as_str());
    out
}

#[allow(clippy::too_many_arguments)]
fn wire(
    req: &Request,
    plan: &Plan,
    ns: &NetNs,
    host: &mut Rtnl,
    ctr: &mut Rtnl,
    addrs: &[Addr],
    ipam_routes: Vec<Route>,
    host_name: &str,
    created_veth: &mut bool,
) -> Result<CniResult> {
    let bridge = net::ensure_bridge(host, plan)?;
    let gateways: Vec<IpAddr> = addrs.iter().filter_map(|a| a.gateway).collect();
    if plan.is_gateway {
        for a in addrs {
            if let Some(gw) = a.gateway {
                let gw_net = IpNet::new(gw, a.net.prefix_len()).expect("same prefix as the address");
                net::ensure_bridge_addr(host, &bridge, gw_net, plan.force_address)?;
            }
        }
        let sysctl = |name: &str| rtnl::sysctl_ensure(name, "1").map_err(PluginError::io(format!("sysctl {name}")));
        if addrs.iter().any(|a| a.net.addr().is_ipv4()) {
            sysctl("net.ipv4.ip_forward")?;
        }
        if addrs.iter().any(|a| a.net.addr().is_ipv6()) {
            sysctl("net.ipv6.conf.all.forwarding")?;
        }
    }

    let port = match net::create_veth(host, plan, &bridge, host_name, &req.ifname, ns) {
        Ok(port) => {
            *created_veth = true;
            port
        }
        Err(e) if e.is_exists() => {
            return Err(PluginError::Invalid(format!(
                "host interface {host_name} (derived from container {} / {}) already exists",
                req.container_id, req.ifname
            )))
        }
        Err(e) => {
            // The kernel may have created the pair before the reply went wrong: let the rollback look for it.
            *created_veth = true;
            return Err(e.into());
        }
    };
    net::configure_port(host, plan, &bridge, &port)?;

    let link = ctr
        .link_get(&req.ifname)?
        .ok_or_else(|| PluginError::Invalid(format!("{} vanished right after creation", req.ifname)))?;
    let mut routes: Vec<Route> = Vec::new();
    if plan.is_default_gateway {
        for gw in &gateways {
            let any: IpNet = if gw.is_ipv4() { "0.0.0.0/0".parse().unwrap() } else { "::/0".parse().unwrap() };
            routes.push(Route::new(any, Some(*gw)));
        }
    }
    for r in ipam_routes {
        // A configured default route gives way to isDefaultGateway's of the same family, as in the reference.
        let have_default =
            routes.iter().any(|d| d.dst.prefix_len() == 0 && d.dst.addr().is_ipv4() == r.dst.addr().is_ipv4());
        if r.dst.prefix_len() == 0 && have_default {
            continue;
        }
        routes.push(r);
    }
    let specs: Vec<RouteSpec> = routes
        .iter()
        .map(|r| {
            let mut s = RouteSpec::new(r.dst).dev(link.index);
            s.gateway = net::route_gateway(&r.dst, r.gw, &gateways);
            s
        })
        .collect();
    let nets: Vec<IpNet> = addrs.iter().map(|a| a.net).collect();
    net::configure_container(ctr, ns, &link, plan.mac, &nets, &specs)?;

    if plan.ip_masq {
        let mine: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
        masq::ensure(&plan.network, &mine, &plan.subnets(), &plan.run_dir)?;
    }

    // A bridge takes the lowest MAC of its ports: read it again now that ours joined.
    let bridge = host.link_get(&plan.bridge)?.unwrap_or(bridge);
    let link = if plan.mac.is_some() { ctr.link_get(&req.ifname)?.unwrap_or(link) } else { link };
    Ok(CniResult {
        interfaces: vec![
            Interface { name: bridge.name.clone(), mac: bridge.mac_string(), ..Default::default() },
            Interface { name: host_name.to_string(), mac: port.mac_string(), ..Default::default() },
            Interface {
                name: req.ifname.clone(),
                mac: link.mac_string(),
                mtu: plan.mtu.filter(|_| plan.version.is_1_1()),
                sandbox: Some(ns.path().display().to_string()),
            },
        ],
        ips: addrs.iter().map(|a| IpConfig { address: a.net, gateway: a.gateway, interface: Some(2) }).collect(),
        routes,
        dns: plan.dns.clone(),
    })
}

/// After a successful ADD of a named pod: the node-local record the agent publishes. If it cannot be written,
/// the ADD is undone and fails (a pod the store never hears of would never get Service traffic).
fn record_pod(req: &Request, plan: &Plan, stdin: &[u8], result: CniResult) -> Result<CniResult> {
    let (Some(namespace), Some(name)) = (req.args.get("K8S_POD_NAMESPACE"), req.args.get("K8S_POD_NAME")) else {
        return Ok(result);
    };
    let mut ips: Vec<IpAddr> = result.ips.iter().map(|i| i.address.addr()).collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    let rec = pods::PodRecord {
        namespace: namespace.clone(),
        name: name.clone(),
        container_id: req.container_id.clone(),
        ifname: req.ifname.clone(),
        ips: ips.iter().map(ToString::to_string).collect(),
        netns: req.netns.as_ref().map(|p| p.display().to_string()),
    };
    if let Err(e) = pods::record(&plan.run_dir, &rec) {
        let _ = del(req, plan, stdin);
        return Err(PluginError::io(format!("recording the pod in {}", pods::dir(&plan.run_dir).display()))(e));
    }
    Ok(result)
}

fn del(req: &Request, plan: &Plan, stdin: &[u8]) -> Result<()> {
    // Best effort: carry on past each failure, report the first one at the end.
    let mut first_err: Option<PluginError> = None;
    if let Err(e) = pods::forget(&plan.run_dir, &req.container_id, &req.ifname) {
        first_err.get_or_insert(PluginError::io("removing the pod record".to_string())(e));
    }
    let host_name = node_contract::host_veth_name(&req.container_id, &req.ifname);
    let ns = req.netns.as_ref().and_then(|p| NetNs::open(p).ok());
    let links = (|| -> Result<()> {
        match &ns {
            Some(ns) => {
                Rtnl::in_netns(ns)?.link_del_name(&req.ifname)?;
            }
            // The namespace is gone, and with it the container end; make sure the host end went too.
            None => {
                Rtnl::new()?.link_del_name(&host_name)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = links {
        first_err.get_or_insert(e);
    }
    if let Err(e) = ipam_del(req, plan, stdin) {
        first_err.get_or_insert(e);
    }
    if plan.ip_masq && matches!(plan.ipam, Ipam::Delegate { .. }) {
        // No store to tell whether this was the network's last pod: the bridge's ports tell.
        if let Err(e) = remove_masq_if_bridge_empty(plan) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn remove_masq_if_bridge_empty(plan: &Plan) -> Result<()> {
    let mut host = Rtnl::new()?;
    let Some(bridge) = host.link_get(&plan.bridge)? else { return masq::remove(&plan.network, &plan.run_dir) };
    if !host.links()?.iter().any(|l| l.master == Some(bridge.index)) {
        masq::remove(&plan.network, &plan.run_dir)?;
    }
    Ok(())
}

fn check(req: &Request, plan: &Plan, stdin: &[u8]) -> Result<()> {
    if !plan.version.has_check() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("CHECK is not defined for cniVersion {}", plan.version),
            "",
        )
        .into());
    }
    let prev = plan.prev_result.as_ref().ok_or_else(|| PluginError::Invalid("CHECK requires prevResult".into()))?;
    let prev = CniResult::from_value(prev)?;
    let netns_path = req.netns.as_ref().expect("CHECK requires CNI_NETNS");
    let ns = NetNs::open(netns_path).map_err(|source| PluginError::Netns { path: netns_path.clone(), source })?;
    let mut ctr = Rtnl::in_netns(&ns)?;
    let mut host = Rtnl::new()?;
    let mismatch = |m: String| Err(PluginError::Mismatch(m));

    let Some(link) = ctr.link_get(&req.ifname)? else {
        return mismatch(format!("{} is missing from {}", req.ifname, netns_path.display()));
    };
    let idx = prev.interfaces.iter().position(|i| i.name == req.ifname && i.sandbox.is_some());
    if let Some(i) = idx {
        if let (Some(want), Some(have)) = (&prev.interfaces[i].mac, link.mac_string()) {
            if !want.eq_ignore_ascii_case(&have) {
                return mismatch(format!("{} has MAC {have}, prevResult says {want}", req.ifname));
            }
        }
    }
    let have: BTreeSet<IpNet> = ctr.addresses(Some(link.index))?.into_iter().map(|(_, a)| a).collect();
    for ip in prev.ips.iter().filter(|ip| ip.interface.is_none() || ip.interface == idx) {
        if !have.contains(&ip.address) {
            return mismatch(format!("{} lacks address {}", req.ifname, ip.address));
        }
    }
    let routes = ctr.routes(false)?;
    for r in &prev.routes {
        let found = routes.iter().any(|have| {
            have.dst == r.dst.trunc() && (r.gw.is_none() || have.gateway.is_none() || have.gateway == r.gw)
        });
        if !found {
            return mismatch(format!("route to {} is missing in the container", r.dst));
        }
    }
    let host_name = node_contract::host_veth_name(&req.container_id, &req.ifname);
    let bridge = host.link_get(&plan.bridge)?;
    match (host.link_get(&host_name)?, bridge) {
        (Some(p), Some(b)) if p.master == Some(b.index) => {}
        (Some(_), Some(_)) => return mismatch(format!("{host_name} is not attached to {}", plan.bridge)),
        (None, _) => return mismatch(format!("host interface {host_name} is missing")),
        (_, None) => return mismatch(format!("bridge {} is missing", plan.bridge)),
    }
    match &plan.ipam {
        Ipam::HostLocal { data_dir, .. } => {
            let store = Store::existing(data_dir, &plan.network)
                .ok_or_else(|| PluginError::Mismatch(format!("no IPAM store for network {}", plan.network)))?;
            let owned: BTreeSet<IpAddr> = store.lock()?.owned_by(&req.container_id, &req.ifname)?.into_iter().collect();
            for ip in prev.ips.iter().filter(|ip| ip.interface.is_none() || ip.interface == idx) {
                if !owned.contains(&ip.address.addr()) {
                    return mismatch(format!("IPAM does not hold {} for this container", ip.address.addr()));
                }
            }
        }
        Ipam::Delegate { plugin } => {
            delegate::exec(plugin, req, "CHECK", stdin)?;
        }
    }
    Ok(())
}

fn valid_attachments(stdin: &[u8]) -> Result<Option<BTreeSet<Attachment>>> {
    let (_, map) = parse_raw(stdin)?;
    // libcni sends both spellings: the spec's current one and the 1.1.0 tag's.
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        if let Some(v) = map.get(key) {
            let list: Vec<Attachment> =
                serde_json::from_value(v.clone()).map_err(|e| PluginError::Invalid(format!("{key}: {e}")))?;
            return Ok(Some(list.into_iter().collect()));
        }
    }
    Ok(None)
}

fn gc(req: &Request, plan: &Plan, stdin: &[u8]) -> Result<()> {
    let Some(valid) = valid_attachments(stdin)? else {
        return Err(PluginError::Invalid("GC requires cni.dev/valid-attachments".into()));
    };
    pods::retain(&plan.run_dir, |id, ifname| valid.iter().any(|a| a.container_id == id && a.ifname == ifname))
        .map_err(PluginError::io("pruning pod records".to_string()))?;
    match &plan.ipam {
        Ipam::HostLocal { data_dir, .. } => {
            let Some(store) = Store::existing(data_dir, &plan.network) else { return Ok(()) };
            let lock = store.lock()?;
            lock.retain(|o| valid.iter().any(|a| o.is(&a.container_id, &a.ifname)))?;
            if plan.ip_masq && lock.list()?.is_empty() {
                masq::remove(&plan.network, &plan.run_dir)?;
            }
            Ok(())
        }
        Ipam::Delegate { plugin } => delegate::exec(plugin, req, "GC", stdin).map(|_| ()),
    }
}

fn status(plan: &Plan) -> Result<()> {
    // Side-effect free: the plan already proved the config valid and, in flannel mode, subnet.env present; the
    // store's directory must be usable if it exists (ADD creates it on first use).
    if let Some(dir) = plan.data_dir().map(|d| d.join(&plan.network)).filter(|d| d.exists()) {
        let md = std::fs::metadata(&dir).map_err(PluginError::io(format!("stat {}", dir.display())))?;
        if !md.is_dir() || md.permissions().readonly() {
            return Err(PluginError::Cni(CniError::new(
                ErrorCode::NotAvailable,
                "IPAM store is not usable",
                format!("{} is not a writable directory", dir.display()),
            )));
        }
    }
    Ok(())
}
