//! Client certificates as credentials: which client a verified certificate names.
//!
//! The TLS listener verifies the chain against the listener's `client_ca`
//! (rustls' `WebPkiClientVerifier`) and hands the end-entity certificate to
//! the request path on [`crate::proxy::Peer`]. This module only reads the
//! client ID out of it, as `[client_certs] id_from` says:
//!
//! | `id_from`   | taken from                          | example value                        | client ID |
//! |-------------|-------------------------------------|--------------------------------------|-----------|
//! | `cn`        | the subject's common name, whole    | `CN=acme`                            | `acme`    |
//! | `san-dns`   | a DNS SAN's leftmost label          | `acme.clients.example.com`           | `acme`    |
//! | `san-uri`   | a URI SAN's last path segment       | `spiffe://example.com/clients/acme`  | `acme`    |
//! | `san-email` | an email SAN's local part           | `acme@clients.example.com`           | `acme`    |
//!
//! The result must be a valid client ID (`[A-Za-z0-9-]{1,64}`,
//! [`crate::key::validate_client_id`]). With several entries of the chosen
//! kind (several CNs, several SANs), the first one giving a valid client ID
//! wins, in certificate order. The client CA is the authority here: every
//! certificate it signs names the client it says, so keep one CA (or one
//! naming scheme) for client certificates and do not reuse a server CA.
//!
//! The certificate's content is never logged and never forwarded upstream:
//! errors say what was missing, not what was there.

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Where a client certificate names its client (`[client_certs] id_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdFrom {
    /// The subject's common name, as is (the default).
    #[default]
    Cn,
    /// A DNS subject alternative name: its leftmost label.
    SanDns,
    /// A URI subject alternative name: its last non-empty path segment.
    SanUri,
    /// An email (RFC 822) subject alternative name: its local part.
    SanEmail,
}

impl IdFrom {
    pub const ALL: [IdFrom; 4] = [Self::Cn, Self::SanDns, Self::SanUri, Self::SanEmail];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cn => "cn",
            Self::SanDns => "san-dns",
            Self::SanUri => "san-uri",
            Self::SanEmail => "san-email",
        }
    }
}

impl fmt::Display for IdFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdFrom {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == s).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
            format!("`{s}` is not one of {}", known.join(", "))
        })
    }
}

/// Why a verified certificate names no client. Carries nothing read from
/// the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CertIdentityError {
    /// The DER does not parse as an X.509 certificate (the verifier
    /// accepted it, so this would be a parser disagreement).
    #[error("the client certificate does not parse")]
    Unparsable,
    /// The certificate has no entry of the kind `id_from` names.
    #[error("the client certificate has no {0} to take the client ID from")]
    Absent(IdFrom),
    /// It has entries of that kind, but none is a valid client ID.
    #[error("no {0} of the client certificate is a valid client ID ([A-Za-z0-9-]{{1,64}})")]
    Invalid(IdFrom),
}

/// The client ID a verified client certificate names, read as `from` says.
pub fn client_id(cert: &CertificateDer<'_>, from: IdFrom) -> Result<String, CertIdentityError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|_| CertIdentityError::Unparsable)?;
    let candidates: Vec<&str> = match from {
        IdFrom::Cn => parsed.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).collect(),
        IdFrom::SanDns | IdFrom::SanUri | IdFrom::SanEmail => {
            // A malformed or duplicated SAN extension names nobody.
            let san = parsed.subject_alternative_name().map_err(|_| CertIdentityError::Absent(from))?;
            san.map(|san| san.value.general_names.iter().filter_map(|name| of_kind(name, from)).collect())
                .unwrap_or_default()
        }
    };
    if candidates.is_empty() {
        return Err(CertIdentityError::Absent(from));
    }
    candidates
        .into_iter()
        .map(|value| id_part(value, from))
        .find(|id| crate::key::validate_client_id(id).is_ok())
        .map(str::to_owned)
        .ok_or(CertIdentityError::Invalid(from))
}

/// The SAN's text if it is of the kind `from` asks for.
fn of_kind<'a>(name: &GeneralName<'a>, from: IdFrom) -> Option<&'a str> {
    match (name, from) {
        (GeneralName::DNSName(dns), IdFrom::SanDns) => Some(dns),
        (GeneralName::URI(uri), IdFrom::SanUri) => Some(uri),
        (GeneralName::RFC822Name(email), IdFrom::SanEmail) => Some(email),
        _ => None,
    }
}

/// The part of an entry that names the client (see the module table).
fn id_part(value: &str, from: IdFrom) -> &str {
    match from {
        IdFrom::Cn => value,
        IdFrom::SanDns => value.split('.').next().unwrap_or(value),
        IdFrom::SanUri => {
            // Past the authority (`scheme://host`), before any query or fragment.
            let path = value.split_once("://").map_or(value, |(_, rest)| rest);
            let path = path.split(['?', '#']).next().unwrap_or(path);
            match path.split_once('/') {
                Some((_authority, path)) => path.rsplit('/').find(|s| !s.is_empty()).unwrap_or(""),
                None => "",
            }
        }
        IdFrom::SanEmail => value.rsplit_once('@').map_or("", |(local, _)| local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_from_parses_its_four_names_and_names_them_when_refusing() {
        for kind in IdFrom::ALL {
            assert_eq!(kind.as_str().parse::<IdFrom>(), Ok(kind));
        }
        let error = "san".parse::<IdFrom>().unwrap_err();
        assert!(error.contains("cn, san-dns, san-uri, san-email"), "{error}");
        assert_eq!(IdFrom::default(), IdFrom::Cn);
    }

    #[test]
    fn each_kind_takes_its_documented_part() {
        assert_eq!(id_part("acme", IdFrom::Cn), "acme");
        assert_eq!(id_part("acme.clients.example.com", IdFrom::SanDns), "acme");
        assert_eq!(id_part("spiffe://example.com/clients/acme", IdFrom::SanUri), "acme");
        assert_eq!(id_part("https://example.com/clients/acme/?x=1#y", IdFrom::SanUri), "acme");
        assert_eq!(id_part("spiffe://example.com", IdFrom::SanUri), "", "no path, no client");
        assert_eq!(id_part("acme@clients.example.com", IdFrom::SanEmail), "acme");
        assert_eq!(id_part("no-at-sign", IdFrom::SanEmail), "", "not an address");
    }

    #[test]
    fn garbage_der_is_unparsable_not_a_panic() {
        let der = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]);
        assert_eq!(client_id(&der, IdFrom::Cn), Err(CertIdentityError::Unparsable));
    }
}
