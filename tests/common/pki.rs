//! A throwaway certificate authority for one test, made with rcgen: a CA,
//! server and client certificates signed by it, written as PEM files in a
//! temporary folder that is deleted with it. No private key is committed,
//! and no OpenSSL command line is needed.
//!
//! ```ignore
//! let ca = TestCa::new("redis");                        // writes ca.pem
//! let server = ca.issue_server("redis", &["127.0.0.1", "localhost"]);
//! let client = ca.issue_client("gateway");
//! // server.cert / server.key / ca.ca_pem(): paths to give redis-server and keygate
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA whose certificate is `ca.pem` in its own temporary folder.
pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA (a fresh key each time: two CAs never trust each other's
    /// certificates), its certificate written to `ca.pem`.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new().prefix("keygate-pki-").tempdir().expect("temp dir for the CA");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, format!("keygate test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("write ca.pem");
        TestCa { dir, issuer }
    }

    /// The folder holding every file this CA wrote.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate for `names` (DNS names or IP addresses), as
    /// `<stem>.pem` and `<stem>-key.pem`.
    pub fn issue_server(&self, stem: &str, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        self.issue(stem, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A server certificate for `names` whose validity ended in 2021
    /// (`not_after` in the past): a TLS client must refuse it.
    pub fn issue_expired_server(&self, stem: &str, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        self.issue_with(stem, names, ExtendedKeyUsagePurpose::ServerAuth, |params| {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    /// A client certificate (for a Redis with `tls-auth-clients yes`).
    pub fn issue_client(&self, stem: &str) -> Issued {
        self.issue(stem, vec![format!("{stem}.clients.test")], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, stem: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Issued {
        self.issue_with(stem, names, usage, |_| {})
    }

    fn issue_with(
        &self,
        stem: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Issued {
        let mut params = CertificateParams::new(names).expect("certificate params");
        adjust(&mut params);
        params.distinguished_name.push(DnType::CommonName, stem);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate().expect("certificate key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign certificate");
        let issued = Issued {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }
}
