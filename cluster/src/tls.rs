//! TLS between nodes (optional): mutual TLS with one CA. Every node presents a certificate the CA signed,
//! whose subject names include the host its peers dial (an IP address SAN for `--cluster-listen` IPs), and
//! accepts only peers that present one too. The cookie still authenticates nodes inside the TLS session.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Where a node's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signs every node's certificate (PEM).
    pub ca: PathBuf,
}

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("cluster TLS: {path}: {reason}")]
    File {
        /// Which file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("cluster TLS: {0}")]
    Config(String),
}

/// Both sides of a node's TLS: accepting peers and dialling them.
#[derive(Clone)]
pub struct ClusterTls {
    /// For the node server's listener.
    pub acceptor: TlsAcceptor,
    /// For dialling peers.
    pub connector: TlsConnector,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls")
    }
}

impl ClusterTls {
    /// Load the files and build both sides.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let file_error = |path: &Path, e: &dyn std::fmt::Display| TlsError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let certs = CertificateDer::pem_file_iter(&files.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| file_error(&files.cert, &e))?;
        let key =
            PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, &e))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&files.ca).map_err(|e| file_error(&files.ca, &e))? {
            let ca = ca.map_err(|e| file_error(&files.ca, &e))?;
            roots.add(ca).map_err(|e| file_error(&files.ca, &e))?;
        }
        let roots = Arc::new(roots);
        let config = |e: tokio_rustls::rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder(roots.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(config)?;
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(config)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// The name a peer at `addr` (`host:port`) must present.
    pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| TlsError::Config(format!("{addr}: {e}")))
    }
}
