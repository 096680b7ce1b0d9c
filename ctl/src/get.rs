//! get: one kind, by name or all, in one namespace or all; Endpoints include the ones computed from selectors.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use kube_objects::{
    derive_endpoints, EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Kind, Object, ObjectMeta, Pod,
};
use store::Store;

use crate::print;

pub async fn get(
    store: &mut Store,
    kind: Kind,
    names: &[String],
    ns: Option<&str>,
    output: Option<&str>,
) -> Result<()> {
    let ns = if kind.namespaced() { ns } else { None };
    let mut objs = if kind == Kind::Endpoints { endpoints(store, ns).await? } else { store.list(kind, ns).await?.0 };
    if !names.is_empty() {
        let missing: Vec<&String> = names.iter().filter(|n| !objs.iter().any(|o| &o.meta().name == *n)).collect();
        if !missing.is_empty() {
            let m: Vec<String> = missing.iter().map(|n| format!("{} \"{n}\" not found", kind.plural())).collect();
            bail!("(NotFound): {}", m.join(", "));
        }
        objs.retain(|o| names.contains(&o.meta().name));
    }
    let single = names.len() == 1;
    match output {
        Some("yaml") | Some("json") => {
            let v = if single {
                serde_json::to_value(&objs[0])?
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objs, "metadata": {"resourceVersion": ""}})
            };
            if output == Some("yaml") {
                print!("{}", serde_yaml::to_string(&v)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        None | Some("wide") => {
            if objs.is_empty() {
                match ns {
                    Some(n) => eprintln!("No resources found in {n} namespace."),
                    None => eprintln!("No resources found"),
                }
                return Ok(());
            }
            print::table(kind, &objs, ns.is_none() && kind.namespaced(), output == Some("wide"));
        }
        Some(o) => bail!("unable to match a printer suitable for the output format {o:?}; allowed: json, yaml, wide"),
    }
    Ok(())
}

/// The Endpoints as kube-proxy sees them: for a Service with a selector, computed from the ready pods (one
/// subset per port); for one without, its stored Endpoints object.
async fn endpoints(store: &mut Store, ns: Option<&str>) -> Result<Vec<Object>> {
    let (services, _) = store.list(Kind::Service, ns).await?;
    let (pods, _) = store.list(Kind::Pod, ns).await?;
    let (stored, _) = store.list(Kind::Endpoints, ns).await?;
    let pods: Vec<Pod> = pods.into_iter().filter_map(|o| if let Object::Pod(p) = o { Some(p) } else { None }).collect();
    let mut stored: BTreeMap<(String, String), Endpoints> = stored
        .into_iter()
        .filter_map(|o| match o {
            Object::Endpoints(e) => {
                Some(((e.metadata.namespace.clone().unwrap_or_default(), e.metadata.name.clone()), e))
            }
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for s in services {
        let Object::Service(svc) = s else { continue };
        if svc.spec.kind.as_deref() == Some("ExternalName") {
            continue;
        }
        let id = (svc.metadata.namespace.clone().unwrap_or_default(), svc.metadata.name.clone());
        if svc.spec.selector.is_none() {
            if let Some(e) = stored.remove(&id) {
                out.push(Object::Endpoints(e));
            }
            continue;
        }
        let derived = derive_endpoints(&svc, &pods, None);
        let subsets = derived
            .iter()
            .filter(|p| !p.backends.is_empty())
            .map(|p| EndpointSubset {
                addresses: p
                    .backends
                    .iter()
                    .map(|b| EndpointAddress { ip: b.ip.clone(), node_name: b.node_name.clone(), ..Default::default() })
                    .collect(),
                not_ready_addresses: vec![],
                ports: vec![EndpointPort {
                    name: p.name.clone(),
                    port: p.backends[0].port.into(),
                    protocol: Some(p.protocol.clone()),
                }],
            })
            .collect();
        out.push(Object::Endpoints(Endpoints {
            api_version: "v1".into(),
            metadata: ObjectMeta {
                name: svc.metadata.name.clone(),
                namespace: svc.metadata.namespace.clone(),
                labels: svc.metadata.labels.clone(),
                creation_timestamp: svc.metadata.creation_timestamp.clone(),
                ..Default::default()
            },
            subsets,
            extra: Default::default(),
        }));
    }
    // Endpoints objects whose Service is not there (yet).
    out.extend(stored.into_values().map(Object::Endpoints));
    out.sort_by(|a, b| {
        (a.meta().namespace.clone(), a.meta().name.clone()).cmp(&(b.meta().namespace.clone(), b.meta().name.clone()))
    });
    Ok(out)
}
