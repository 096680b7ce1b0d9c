use std::path::Path;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::StoreError;

/// etcd TLS material (CA, client certificate and key, PEM), read once at start.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub ca: Option<Vec<u8>>,
    /// (certificate, key).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Tls {
    /// None when no file is given (plain http).
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Tls>, StoreError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| StoreError::Config(format!("reading {}: {e}", p.display())));
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => return Err(StoreError::Config("the etcd certificate and key files go together".into())),
        };
        let ca = ca.map(read).transpose()?;
        Ok((ca.is_some() || identity.is_some()).then_some(Tls { ca, identity }))
    }
}

/// A client for the comma-separated `endpoints`.
pub async fn connect(endpoints: &str, tls: Option<&Tls>) -> Result<Client, StoreError> {
    let eps: Vec<&str> = endpoints.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let Some(t) = tls {
        let mut o = TlsOptions::new();
        if let Some(ca) = &t.ca {
            o = o.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &t.identity {
            o = o.identity(Identity::from_pem(cert, key));
        }
        opts = opts.with_tls(o);
    }
    Client::connect(eps, Some(opts)).await.map_err(|e| StoreError::Connect(endpoints.to_string(), e))
}
