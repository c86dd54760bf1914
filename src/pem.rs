//! Reading the PEM files TLS settings name (CA bundles, certificates, keys).
//!
//! Shared by every TLS client keygate builds (`rediss://` in
//! [`crate::redis_target`], `https://` upstreams in [`crate::upstream_tls`]),
//! so a file is refused the same way, with the same words, whichever field
//! names it. Messages name the file and say what is wrong with it; callers
//! add the field. They never hold a file's contents.

use std::io::Read;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Larger files are refused: a CA bundle of every public root is about
/// 220 KiB, and a path to something huge (or endless, like `/dev/zero`)
/// must not be read into memory.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// A regular file's contents, at most [`MAX_PEM_BYTES`].
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    let cannot = |why: &dyn std::fmt::Display| format!("cannot read {}: {why}", path.display());
    // Checked before opening: opening a FIFO would wait for a writer.
    let meta = std::fs::metadata(path).map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        return Err(cannot(&"not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(cannot(&format_args!("larger than {} KiB", MAX_PEM_BYTES >> 10)));
    }
    Ok(bytes)
}

/// Every certificate in a PEM file's contents; at least one.
pub fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display()));
    }
    Ok(certs)
}

/// The first private key in a PEM file's contents (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("{} holds no usable PEM private key: {e}", path.display()))
}

/// The Ed25519 key in a PKCS#8 PEM file (`[tokens] signing_key`), as DER,
/// checked by ring to be an Ed25519 key pair (`openssl genpkey -algorithm
/// ed25519` writes one). The message never holds the key.
pub fn ed25519_key(path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(path)?;
    let PrivateKeyDer::Pkcs8(der) = private_key(path, &pem)? else {
        return Err(format!("{} holds a private key that is not PKCS#8", path.display()));
    };
    let der = der.secret_pkcs8_der().to_vec();
    ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|_| format!("{} holds no Ed25519 key pair", path.display()))?;
    Ok(der)
}

/// A root store of every certificate in a CA file (read with [`read`]),
/// each checked to be usable as a trust anchor.
pub fn roots(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certificates(path, pem)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate {} in {} is not usable as a CA: {e}", i + 1, path.display()))?;
    }
    Ok(roots)
}
