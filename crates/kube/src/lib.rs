//! The cluster's objects in Kubernetes' own shapes, so that manifests written for Kubernetes apply unchanged:
//! Namespace, Pod, Node, Service, Endpoints (v1) and NetworkPolicy (networking.k8s.io/v1). Fields Tartan does not
//! use are kept as they came (`extra`), as the API server keeps fields a client does not know.
//!
//! Pure: parsing manifests, validation, label selectors and derived endpoints. The etcd side is the `store` crate.

mod endpoints;
mod manifest;
mod objects;
mod selector;
mod validate;

pub use endpoints::{derive_endpoints, derive_endpoints_from, pod_ready, Backend, PortEndpoints};
pub use manifest::{parse_manifests, to_object, Document, ManifestError};
pub use objects::*;
pub use selector::{matches, Requirement};
pub use validate::{validate, FieldError};
