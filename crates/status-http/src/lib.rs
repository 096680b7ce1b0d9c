//! The daemons answer a handful of GET paths for probes and scrapers (kubelet's liveness and readiness probes,
//! Prometheus). That needs no HTTP stack: read the request line, answer, close.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One answer.
pub struct Reply {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn json(code: u16, body: impl ToString) -> Reply {
        Reply { code, content_type: "application/json", body: body.to_string() }
    }

    /// Plain text, in the Prometheus text exposition format's content type.
    pub fn text(code: u16, body: impl Into<String>) -> Reply {
        Reply { code, content_type: "text/plain; version=0.0.4", body: body.into() }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// The whole response for `reply`, connection closed after it.
pub fn render(reply: &Reply) -> String {
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.code,
        reason(reply.code),
        reply.content_type,
        reply.body.len(),
        reply.body
    )
}

/// Binds `addr`, then answers every request with `handler(path)` until the task is dropped.
pub async fn serve<F>(addr: SocketAddr, handler: F) -> std::io::Result<()>
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let handler = Arc::new(handler);
    loop {
        let (mut sock, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let _ = sock.write_all(render(&handler(path)).as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_a_complete_response() {
        let r = render(&Reply::json(503, "{\"ready\":false}"));
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("Content-Length: 15\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n{\"ready\":false}"), "{r}");
    }

    #[tokio::test]
    async fn serves_what_the_handler_answers_for_the_path() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        tokio::spawn(serve(addr, |path| match path {
            "/healthz" => Reply::text(200, "ok\n"),
            _ => Reply::text(404, "not found\n"),
        }));
        for (path, want) in [("/healthz", "HTTP/1.1 200 OK"), ("/nope", "HTTP/1.1 404 Not Found")] {
            let mut sock = loop {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => break s,
                    Err(_) => tokio::task::yield_now().await,
                }
            };
            sock.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
            let mut out = String::new();
            sock.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with(want), "{out}");
        }
    }
}
