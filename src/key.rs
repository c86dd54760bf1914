//! The API key string: format, parsing, generation and hashing.
//!
//! A key reads `<prefix><client>_<secret><checksum>`, e.g.
//! `kg_12345-ABCDE_<43 base62 chars><6 base62 chars>`:
//! - the client ID (`[A-Za-z0-9-]{1,64}`) is readable and not secret;
//! - the secret is 256 bits from the OS CSPRNG, base62 so a double click selects it;
//! - the checksum (CRC32 of everything before it) lets the gateway reject a
//!   mistyped or forged-format key before any store lookup.
//!
//! Only the SHA-256 of the secret is ever stored. Types holding a secret redact
//! it in `Debug`/`Display`.

// (types below are the interface shared with the store; parsing and
// generation are filled in by the key-format work)

use std::fmt;

use serde::{Deserialize, Serialize};

/// SHA-256 of a key's secret: how a store finds a record. Shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hash is not the secret, but keep log lines short.
        write!(f, "SecretHash({}…)", &self.to_hex()[..12])
    }
}

impl Serialize for SecretHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for SecretHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_hex(&s).ok_or_else(|| serde::de::Error::custom("secret hash must be 64 hex characters"))
    }
}

/// A key's public identifier, `<client>.<kid>`: the client ID and a short
/// random suffix unique within the client. Safe to log, show and put in URLs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl KeyId {
    /// Builds `<client>.<kid>`; the caller has validated both parts.
    pub fn new(client: &str, kid: &str) -> Self {
        Self(format!("{client}.{kid}"))
    }

    pub fn client(&self) -> &str {
        self.0.split_once('.').map_or(&self.0, |(client, _)| client)
    }

    pub fn kid(&self) -> &str {
        self.0.split_once('.').map_or("", |(_, kid)| kid)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for KeyId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (client, kid) =
            s.split_once('.').ok_or_else(|| format!("key id `{s}` must look like CLIENT.KID"))?;
        let valid_client = !client.is_empty()
            && client.len() <= 64
            && client.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let valid_kid = !kid.is_empty() && kid.len() <= 32 && kid.bytes().all(|b| b.is_ascii_alphanumeric());
        if valid_client && valid_kid {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "key id `{s}` must look like CLIENT.KID (client [A-Za-z0-9-]{{1,64}}, kid alphanumeric)"
            ))
        }
    }
}
