//! TLS from the proxy to its servers (ProxySQL's `mysql_servers.use_ssl` and
//! `mysql-ssl_p2s_*`): a proxy usually runs on another host than its databases, and
//! without TLS every statement, result and login exchange crosses the network in clear.
//!
//! One rustls client configuration for the whole proxy, built the first time a server with
//! `use_ssl` needs it (and at start, so a bad CA file stops the proxy instead of failing
//! connections later). The server certificate is verified against `ssl_p2s_ca` (the
//! system's CA bundle when empty) and, with `ssl_p2s_verify = "identity"` (the default,
//! MySQL's VERIFY_IDENTITY), must also name the server's host (DNS name or IP address);
//! `"ca"` (VERIFY_CA) checks the chain only, for certificates issued to other names.
//! `ssl_p2s_cert` / `ssl_p2s_key` add a client certificate for servers that require one.

use crate::config::{ProxyConfig, TlsVerify};
use std::sync::{Arc, OnceLock};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// Debian's (and most distributions') CA bundle: the trust anchors when `ssl_p2s_ca` is empty.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The backend TLS settings and, once built, the client configuration.
pub struct BackendTls {
    ca: String,
    cert: String,
    key: String,
    verify: TlsVerify,
    built: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl BackendTls {
    pub fn new(p: &ProxyConfig) -> Self {
        Self {
            ca: p.ssl_p2s_ca.clone(),
            cert: p.ssl_p2s_cert.clone(),
            key: p.ssl_p2s_key.clone(),
            verify: p.ssl_p2s_verify,
            built: OnceLock::new(),
        }
    }

    /// The CA file in use (the system bundle when none is configured).
    pub fn ca_file(&self) -> &str {
        if self.ca.is_empty() {
            SYSTEM_CA_BUNDLE
        } else {
            &self.ca
        }
    }

    pub fn verify(&self) -> TlsVerify {
        self.verify
    }

    /// The client configuration (built once; the error, if any, is kept and repeated).
    pub fn config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.built.get_or_init(|| self.build()).clone()
    }

    fn build(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let ca = self.ca_file();
        let mut roots = rustls::RootCertStore::empty();
        let certs = read_certs(ca, "ssl_p2s_ca")?;
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("ssl_p2s_ca {ca} holds no usable CA certificate"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("ssl_p2s_ca {ca}: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.verify {
            TlsVerify::Identity => webpki,
            TlsVerify::Ca => Arc::new(ChainOnly(webpki)),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let cfg = match (self.cert.is_empty(), self.key.is_empty()) {
            (true, true) => builder.with_no_client_auth(),
            (false, false) => {
                let chain = read_certs(&self.cert, "ssl_p2s_cert")?;
                let key = read_key(&self.key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("ssl_p2s_cert/ssl_p2s_key: {e}"))?
            }
            _ => return Err("ssl_p2s_cert and ssl_p2s_key go together (a client certificate needs its key)".into()),
        };
        Ok(Arc::new(cfg))
    }

    /// The same trust settings for mysql_async (health checks, KILL QUERY, failover probes).
    pub fn mysql_async_opts(&self) -> mysql_async::SslOpts {
        let mut o = mysql_async::SslOpts::default()
            .with_root_certs(vec![std::path::PathBuf::from(self.ca_file()).into()])
            .with_disable_built_in_roots(true)
            .with_danger_skip_domain_validation(self.verify == TlsVerify::Ca);
        if !self.cert.is_empty() && !self.key.is_empty() {
            o = o.with_client_identity(Some(mysql_async::ClientIdentity::new(
                std::path::PathBuf::from(&self.cert).into(),
                std::path::PathBuf::from(&self.key).into(),
            )));
        }
        o
    }
}

/// The name a server certificate must carry: the configured host, as an IP address or a
/// DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host} is not a name TLS can verify: {e}"))
}

fn read_certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read {what} {path}: {e}"))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} {path} holds no certificate"));
    }
    Ok(certs)
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read ssl_p2s_key {path}: {e}"))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(f))
        .map_err(|e| format!("ssl_p2s_key {path}: {e}"))?
        .ok_or_else(|| format!("ssl_p2s_key {path} holds no private key"))
}

/// VERIFY_CA: the chain must lead to a trusted CA and be valid now; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
