//! The change tracker (kube-proxy's ServiceChangeTracker and EndpointsChangeTracker in one): it keeps the store's
//! objects indexed, and a store event marks only what it can affect (a Service, the Services whose selector matches
//! a pod's old or new labels, the policy model) as dirty. [`Tracker::state`] recomputes the dirty parts alone, so
//! one event costs work proportional to what changed, not a rebuild of the whole cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube_objects::{Endpoints, Kind, Labels, NetworkPolicy, Object, Pod, Service};

use crate::dataplane::State;
use crate::policy::{policy_model_of, PolicyModel};
use crate::service::{ports_of, ServicePort};

type Name = (String, String);

pub struct Tracker {
    node: String,
    /// Pods by namespace, then name.
    pods: BTreeMap<String, BTreeMap<String, Pod>>,
    services: BTreeMap<Name, Service>,
    endpoints: BTreeMap<Name, Endpoints>,
    namespaces: BTreeMap<String, Labels>,
    policies: BTreeMap<Name, NetworkPolicy>,
    /// (namespace, name) of this node's pods -> their host-side veth.
    veths: BTreeMap<Name, String>,
    /// Each Service's ports as last computed.
    ports: BTreeMap<Name, Vec<ServicePort>>,
    dirty: BTreeSet<Name>,
    policy_dirty: bool,
    state: State,
}

fn ns_of(meta: &kube_objects::ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

/// Whether a Service's selector picks pods with `labels` (a Service without a selector picks none).
fn selects(svc: &Service, labels: &Labels) -> bool {
    svc.spec.selector.as_ref().is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

impl Tracker {
    pub fn new(node: &str) -> Tracker {
        Tracker {
            node: node.to_string(),
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            policies: BTreeMap::new(),
            veths: BTreeMap::new(),
            ports: BTreeMap::new(),
            dirty: BTreeSet::new(),
            policy_dirty: true,
            state: State::default(),
        }
    }

    /// Replaces everything with a fresh listing (start, or a re-list after a compacted watch).
    pub fn reset(&mut self, objects: Vec<Object>) {
        self.pods.clear();
        self.services.clear();
        self.endpoints.clear();
        self.namespaces.clear();
        self.policies.clear();
        self.dirty.extend(self.ports.keys().cloned());
        for o in objects {
            self.upsert(o);
        }
        self.policy_dirty = true;
    }

    /// How many Services have changes waiting (a policy change counts as one).
    pub fn pending_services(&self) -> usize {
        self.dirty.len() + usize::from(self.policy_dirty)
    }

    /// Whether a change waits to be computed.
    pub fn pending(&self) -> bool {
        !self.dirty.is_empty() || self.policy_dirty
    }

    /// The services in `ns` that select `labels`, marked dirty.
    fn touch_selecting(&mut self, ns: &str, labels: &Labels) {
        let from = (ns.to_string(), String::new());
        let hit: Vec<Name> = self
            .services
            .range(from..)
            .take_while(|((n, _), _)| n == ns)
            .filter(|(_, svc)| selects(svc, labels))
            .map(|(k, _)| k.clone())
            .collect();
        self.dirty.extend(hit);
    }

    /// An object created or changed.
    pub fn upsert(&mut self, o: Object) {
        let name = o.meta().name.clone();
        match o {
            Object::Pod(p) => {
                let ns = ns_of(&p.metadata);
                let old = self.pods.entry(ns.clone()).or_default().remove(&name);
                if let Some(old) = &old {
                    if same_object(&Object::Pod(old.clone()), &Object::Pod(p.clone())) {
                        self.pods.entry(ns).or_default().insert(name, p);
                        return;
                    }
                    self.touch_selecting(&ns, &old.metadata.labels);
                }
                self.touch_selecting(&ns, &p.metadata.labels);
                self.pods.entry(ns).or_default().insert(name, p);
                self.policy_dirty = true;
            }
            Object::Service(s) => {
                let key = (ns_of(&s.metadata), name);
                self.services.insert(key.clone(), s);
                self.dirty.insert(key);
            }
            Object::Endpoints(e) => {
                let key = (ns_of(&e.metadata), name);
                self.endpoints.insert(key.clone(), e);
                self.dirty.insert(key);
            }
            Object::Namespace(n) => {
                if self.namespaces.insert(name, n.metadata.labels.clone()).as_ref() != Some(&n.metadata.labels) {
                    self.policy_dirty = true;
                }
            }
            Object::NetworkPolicy(np) => {
                self.policies.insert((ns_of(&np.metadata), name), np);
                self.policy_dirty = true;
            }
            Object::Node(_) => {}
        }
    }

    /// An object deleted.
    pub fn remove(&mut self, kind: Kind, namespace: Option<&str>, name: &str) {
        let key = (namespace.unwrap_or("default").to_string(), name.to_string());
        match kind {
            Kind::Pod => {
                let old = self.pods.get_mut(&key.0).and_then(|m| m.remove(name));
                if let Some(old) = old {
                    self.touch_selecting(&key.0, &old.metadata.labels);
                    self.policy_dirty = true;
                }
            }
            Kind::Service => {
                self.services.remove(&key);
                self.dirty.insert(key);
            }
            Kind::Endpoints => {
                self.endpoints.remove(&key);
                self.dirty.insert(key);
            }
            Kind::Namespace => {
                self.policy_dirty |= self.namespaces.remove(name).is_some();
            }
            Kind::NetworkPolicy => {
                self.policy_dirty |= self.policies.remove(&key).is_some();
            }
            Kind::Node => {}
        }
    }

    /// This node's pods' host-side veths (from the CNI plugin's records), for anti-spoofing and egress matching.
    pub fn set_veths(&mut self, veths: BTreeMap<Name, String>) {
        if veths != self.veths {
            self.veths = veths;
            self.policy_dirty = true;
        }
    }

    /// The desired state, recomputing only what changed since the last call. The generation moves only when the
    /// state does.
    pub fn state(&mut self) -> State {
        let mut changed = false;
        for key in std::mem::take(&mut self.dirty) {
            let new = match self.services.get(&key) {
                Some(svc) => {
                    let pods = self.pods.get(&key.0).into_iter().flat_map(|m| m.values());
                    ports_of(svc, pods, self.endpoints.get(&key), &self.node)
                }
                None => Vec::new(),
            };
            let old = if new.is_empty() { self.ports.remove(&key) } else { self.ports.insert(key, new.clone()) };
            changed |= old.unwrap_or_default() != new;
        }
        let mut services = None;
        if changed {
            let mut all: Vec<ServicePort> = self.ports.values().flatten().cloned().collect();
            all.sort_by(|a, b| a.id.cmp(&b.id));
            services = Some(Arc::new(all));
        }
        let mut policy = None;
        if std::mem::take(&mut self.policy_dirty) {
            let model = self.policy_model();
            if model != *self.state.policy {
                policy = Some(Arc::new(model));
            }
        }
        if services.is_some() || policy.is_some() {
            self.state = State {
                generation: self.state.generation + 1,
                services: services.unwrap_or_else(|| self.state.services.clone()),
                policy: policy.unwrap_or_else(|| self.state.policy.clone()),
            };
        }
        self.state.clone()
    }

    fn policy_model(&self) -> PolicyModel {
        let pods: Vec<&Pod> = self.pods.values().flat_map(|m| m.values()).collect();
        let namespaces: BTreeMap<String, &Labels> = self.namespaces.iter().map(|(k, v)| (k.clone(), v)).collect();
        let policies: Vec<&NetworkPolicy> = self.policies.values().collect();
        policy_model_of(&pods, &namespaces, &policies, &self.node, &self.veths)
    }
}

/// Equal but for the resourceVersion (a write that changed nothing we read).
fn same_object(a: &Object, b: &Object) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    a.meta_mut().resource_version = None;
    b.meta_mut().resource_version = None;
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::objects;

    fn pod(name: &str, app: &str, ip: &str) -> Object {
        objects(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}\n"
        ))
        .remove(0)
    }

    fn svc(name: &str, app: &str, ip: &str) -> Object {
        objects(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, selector: {{app: {app}}}, ports: [{{port: 80}}]}}\n"
        ))
        .remove(0)
    }

    #[test]
    fn a_pod_change_recomputes_only_the_services_selecting_it() {
        let mut t = Tracker::new("n1");
        t.reset(vec![svc("a", "a", "10.96.0.1"), svc("b", "b", "10.96.0.2"), pod("pa", "a", "10.244.1.2")]);
        let s0 = t.state();
        assert_eq!(s0.services.len(), 2);
        assert_eq!(s0.services[0].cluster.len(), 1);
        assert!(!t.pending());
        t.upsert(pod("pb", "b", "10.244.1.3"));
        assert_eq!(t.dirty.iter().map(|k| k.1.as_str()).collect::<Vec<_>>(), ["b"], "only b selects pb");
        let s1 = t.state();
        assert_eq!(s1.generation, s0.generation + 1);
        assert_eq!(s1.services[1].cluster.len(), 1);
        assert_eq!(s1.policy.pods.len(), 2, "a new local pod enters the policy model (anti-spoofing)");
        // Relabelled from b to a: both services change.
        t.upsert(pod("pb", "a", "10.244.1.3"));
        assert_eq!(t.dirty.len(), 2);
        let s2 = t.state();
        assert_eq!((s2.services[0].cluster.len(), s2.services[1].cluster.len()), (2, 0));
        // A write that changes nothing leaves the generation alone.
        t.upsert(pod("pb", "a", "10.244.1.3"));
        assert_eq!(t.state().generation, s2.generation);
        t.remove(Kind::Service, Some("default"), "a");
        let s3 = t.state();
        assert_eq!(s3.services.len(), 1);
        assert!(s3.generation > s2.generation);
    }
}
