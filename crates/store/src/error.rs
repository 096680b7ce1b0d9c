use kube_objects::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connecting to etcd at {0}: {1}")]
    Connect(String, #[source] etcd_client::Error),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A request that kept failing on every member tried.
    #[error("etcd {what} failed after {attempts} attempts (endpoints {endpoints}): {source}")]
    Request {
        what: &'static str,
        endpoints: String,
        attempts: u32,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{0}")]
    Config(String),
    /// Validation failed: every field at fault.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    #[error("{0} {1}: not found")]
    NotFound(&'static str, String),
    /// Optimistic concurrency: the object changed since the caller read it.
    #[error("{0} {1}: the object has been modified; read it again and retry")]
    Conflict(&'static str, String),
    #[error("{key}: stored value is not a valid object: {reason}")]
    Decode { key: String, reason: String },
}
