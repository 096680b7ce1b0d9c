//! What every Tartan daemon shows an operator, the way flanneld, kube-proxy and Cilium show it: leveled logs through
//! `tracing` (an env filter, klog-style `-v N`, text or JSON), and Prometheus metrics from `prometheus-client`
//! with kube-proxy's probe semantics, served over a real HTTP stack (axum on hyper).

#[cfg(feature = "http")]
pub mod http;
pub mod logging;

#[cfg(feature = "http")]
pub use http::{serve, Endpoints, Probe};
pub use logging::{init as init_logging, init_cli, init_from_env, LogArgs, LogFormat};
#[cfg(feature = "http")]
pub use prometheus_client;
