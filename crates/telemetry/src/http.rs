//! The daemons' HTTP endpoints on axum: `/metrics` (the registry in the OpenMetrics text format, which Prometheus
//! scrapes natively), `/healthz` and `/readyz` (what kubelet probes), 404 elsewhere.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// A probe's answer: 200 when `ok`, 503 otherwise, with a body saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    pub body: String,
    pub content_type: &'static str,
}

impl Probe {
    pub fn text(ok: bool, body: impl Into<String>) -> Probe {
        Probe { ok, body: body.into(), content_type: "text/plain; charset=utf-8" }
    }

    pub fn json(ok: bool, body: impl ToString) -> Probe {
        Probe { ok, body: body.to_string(), content_type: "application/json" }
    }
}

impl IntoResponse for Probe {
    fn into_response(self) -> Response {
        let code = if self.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (code, [(header::CONTENT_TYPE, self.content_type)], self.body).into_response()
    }
}

/// What a daemon exposes.
pub trait Endpoints: Send + Sync + 'static {
    fn registry(&self) -> &Registry;
    fn healthz(&self) -> Probe;
    fn readyz(&self) -> Probe;
}

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry's exposition.
pub fn exposition(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoding error would be a bug in a metric's definition.
    prometheus_client::encoding::text::encode(&mut out, registry).expect("metrics encode into a String");
    out
}

pub fn router(e: Arc<dyn Endpoints>) -> Router {
    let (m, h, r) = (e.clone(), e.clone(), e);
    Router::new()
        .route(
            "/metrics",
            get(move || async move { ([(header::CONTENT_TYPE, OPENMETRICS)], exposition(m.registry())) }),
        )
        .route("/healthz", get(move || async move { h.healthz() }))
        .route("/readyz", get(move || async move { r.readyz() }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
}

/// Binds `addr` and serves `e` until the task is dropped.
pub async fn serve(addr: SocketAddr, e: Arc<dyn Endpoints>) -> std::io::Result<()> {
    serve_on(tokio::net::TcpListener::bind(addr).await?, e).await
}

/// Serves `e` on a socket bound beforehand (so that a daemon can report a taken port at start, before it spawns).
pub async fn serve_on(listener: tokio::net::TcpListener, e: Arc<dyn Endpoints>) -> std::io::Result<()> {
    axum::serve(listener, router(e)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed(Registry, bool);

    impl Endpoints for Fixed {
        fn registry(&self) -> &Registry {
            &self.0
        }
        fn healthz(&self) -> Probe {
            Probe::text(true, "ok\n")
        }
        fn readyz(&self) -> Probe {
            Probe::json(self.1, "{\"ready\":false}")
        }
    }

    async fn get_raw(addr: SocketAddr, path: &str) -> String {
        let mut sock = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => break s,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        sock.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_probes_and_404() {
        let mut reg = Registry::default();
        let c = Counter::<u64>::default();
        reg.register("things", "Things seen", c.clone());
        c.inc_by(3);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        tokio::spawn(serve(addr, Arc::new(Fixed(reg, false))));
        let m = get_raw(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
        assert!(m.contains("things_total 3\n") && m.contains("# EOF"), "{m}");
        assert!(get_raw(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK"));
        let r = get_raw(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503") && r.ends_with("{\"ready\":false}"), "{r}");
        assert!(get_raw(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
