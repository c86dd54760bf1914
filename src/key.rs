//! The API key string: format, parsing, generation and hashing.
//!
//! A key reads `<prefix><client>_<secret><checksum>`, e.g.
//! `kg_12345-ABCDE_<43 base62 chars><6 base62 chars>`:
//! - the prefix is configurable (default `kg_`); it is `[A-Za-z0-9_]{2,16}`, starts
//!   with a letter or digit and ends with `_`, so the prefix never runs into the
//!   client ID when a person reads the key, and secret scanners can match it;
//! - the client ID (`[A-Za-z0-9-]{1,64}`) is readable and not secret;
//! - the secret is 43 base62 characters (62^43 > 2^256) from the OS CSPRNG,
//!   base62 so a double click selects the whole key;
//! - the checksum is the CRC32 of everything before it, as 6 base62 characters,
//!   zero-padded. It lets the gateway reject a mistyped or forged-format key
//!   before any store lookup: CRC32 catches every single-character substitution.
//!
//! Only the SHA-256 of the secret is ever stored ([`hash_secret`]). Types holding
//! a secret ([`ParsedKey`], [`SecretString`]) redact it in `Debug`/`Display`.
//!
//! [`parse`] sits on the hot path and sees attacker-controlled input: it is
//! total, allocation-free and rejects anything longer than [`MAX_KEY_LEN`] before
//! looking at it.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

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

// === Format constants ===

/// The prefix used when the configuration does not name one.
pub const DEFAULT_PREFIX: &str = "kg_";
/// Longest accepted prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 16;
/// Longest accepted client ID, in bytes.
pub const MAX_CLIENT_LEN: usize = 64;
/// Length of the secret: 43 base62 characters carry 256.03 bits.
pub const SECRET_LEN: usize = 43;
/// Length of the checksum: 62^6 > 2^32, so any CRC32 fits.
pub const CHECKSUM_LEN: usize = 6;
/// Length of the random part of a [`KeyId`].
pub const KID_LEN: usize = 8;
/// Longest well-formed key: anything longer is rejected before it is read.
pub const MAX_KEY_LEN: usize = MAX_PREFIX_LEN + MAX_CLIENT_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

/// Base62 digits in ascending value order, so the checksum's zero-padding is `0`.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

// === Errors ===

/// Why a key string, client ID or prefix was refused.
///
/// Safe to log: it names the rule that failed, never the text that failed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("key is too short to hold a client ID, a secret and a checksum")]
    TooShort,
    #[error("key does not start with the configured prefix")]
    WrongPrefix,
    #[error("key has no `_` between the client ID and the secret")]
    MissingSeparator,
    #[error("key's secret or checksum holds characters other than A-Z a-z 0-9")]
    NotBase62,
    #[error("key's checksum does not match (mistyped or forged key)")]
    BadChecksum,
    /// The client ID breaks a rule; the reason says which.
    #[error("invalid client ID: {0}")]
    InvalidClient(&'static str),
    /// The configured prefix breaks a rule; the reason says which.
    #[error("invalid key prefix: {0}")]
    InvalidPrefix(&'static str),
    /// The OS random number generator failed; no key can be generated safely.
    #[error("the OS random number generator failed")]
    RandomUnavailable,
}

// === Validation ===

/// Checks a client ID: 1 to 64 characters of `A-Z a-z 0-9 -`.
pub fn validate_client_id(client: &str) -> Result<(), KeyFormatError> {
    if client.is_empty() {
        return Err(KeyFormatError::InvalidClient("must not be empty"));
    }
    if client.len() > MAX_CLIENT_LEN {
        return Err(KeyFormatError::InvalidClient("must be at most 64 characters"));
    }
    if !client.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(KeyFormatError::InvalidClient("only A-Z a-z 0-9 and - are allowed"));
    }
    Ok(())
}

/// Checks a key prefix: 2 to 16 characters of `A-Z a-z 0-9 _`, starting with a
/// letter or digit and ending with `_` (e.g. `kg_`, `acme_live_`).
///
/// The trailing `_` keeps the prefix visibly apart from the client ID; config
/// loading calls this so a bad prefix is caught before the gateway starts.
pub fn validate_prefix(prefix: &str) -> Result<(), KeyFormatError> {
    let bytes = prefix.as_bytes();
    if bytes.len() < 2 || bytes.len() > MAX_PREFIX_LEN {
        return Err(KeyFormatError::InvalidPrefix("must be 2 to 16 characters"));
    }
    if !bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(KeyFormatError::InvalidPrefix("only A-Z a-z 0-9 and _ are allowed"));
    }
    if !bytes[0].is_ascii_alphanumeric() {
        return Err(KeyFormatError::InvalidPrefix("must start with a letter or digit"));
    }
    if bytes[bytes.len() - 1] != b'_' {
        return Err(KeyFormatError::InvalidPrefix("must end with _"));
    }
    Ok(())
}

// === Parsing ===

/// A well-formed key string, split into its parts. Borrowed from the input: no allocation.
///
/// Well-formed is not valid: the store still has to know the secret's hash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    /// The client ID; not secret.
    pub client: &'a str,
    /// The secret; redacted in `Debug`. Hash it with [`hash_secret`].
    pub secret: &'a str,
}

impl ParsedKey<'_> {
    /// The store lookup hash of this key's secret.
    pub fn secret_hash(&self) -> SecretHash {
        hash_secret(self.secret)
    }
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedKey").field("client", &self.client).field("secret", &"<redacted>").finish()
    }
}

/// Splits and checks a presented key against the configured `prefix`.
///
/// Never panics, never allocates, and reads at most [`MAX_KEY_LEN`] bytes:
/// longer input is refused on its length alone. Checks, cheapest first:
/// length, prefix, separator, alphabet, checksum, client ID.
pub fn parse<'a>(input: &'a str, prefix: &str) -> Result<ParsedKey<'a>, KeyFormatError> {
    if input.len() > MAX_KEY_LEN {
        return Err(KeyFormatError::TooLong);
    }
    let rest = input.strip_prefix(prefix).ok_or(KeyFormatError::WrongPrefix)?;
    // rest = <client> "_" <secret> <checksum>, the last two of fixed length.
    const TAIL: usize = SECRET_LEN + CHECKSUM_LEN;
    if rest.len() < 1 + 1 + TAIL {
        return Err(KeyFormatError::TooShort);
    }
    // `split_at_checked` refuses a split inside a multi-byte character instead of panicking.
    let (head, tail) = rest.split_at_checked(rest.len() - TAIL).ok_or(KeyFormatError::NotBase62)?;
    if !tail.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyFormatError::NotBase62);
    }
    let client = head.strip_suffix('_').ok_or(KeyFormatError::MissingSeparator)?;
    // The tail is ASCII, so these splits fall on character boundaries.
    let (secret, checksum) = tail.split_at(SECRET_LEN);
    let signed = &input[..input.len() - CHECKSUM_LEN];
    if encode_checksum(crc32fast::hash(signed.as_bytes())) != checksum.as_bytes() {
        return Err(KeyFormatError::BadChecksum);
    }
    validate_client_id(client)?;
    Ok(ParsedKey { client, secret })
}

/// CRC32 as exactly 6 base62 digits, most significant first, zero-padded.
fn encode_checksum(mut crc: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for digit in out.iter_mut().rev() {
        *digit = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    out
}

// === Hashing ===

/// The SHA-256 of a key's secret: what the store keeps and looks records up by.
///
/// The secret has 256 bits of entropy, so a plain (unsalted, fast) hash is
/// enough: there is nothing to brute-force.
pub fn hash_secret(secret: &str) -> SecretHash {
    use sha2::{Digest, Sha256};
    SecretHash(Sha256::digest(secret.as_bytes()).into())
}

// === Generation ===

/// A string that must not be shown by accident: the full key at issue time.
///
/// `Debug` and `Display` print `<redacted>`; read it with [`SecretString::expose`].
/// It is not zeroed on drop: the key also passes through the CLI's stdout
/// buffers, so wiping this one copy would promise more than it delivers.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    /// The clear text. Call it only where the secret is meant to be seen.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A freshly generated key: shown once, then only its hash is kept.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// The full key string, `<prefix><client>_<secret><checksum>`.
    pub key: SecretString,
    /// The new key's public ID, `<client>.<kid>` with a random 8-character kid.
    pub id: KeyId,
    /// SHA-256 of the secret part, for the store.
    pub hash: SecretHash,
}

/// Generates a key for `client` with a fresh secret and kid from the OS CSPRNG.
pub fn generate(prefix: &str, client: &str) -> Result<GeneratedKey, KeyFormatError> {
    validate_prefix(prefix)?;
    validate_client_id(client)?;
    let secret = random_base62(SECRET_LEN)?;
    let kid = random_base62(KID_LEN)?;

    let mut key = String::with_capacity(prefix.len() + client.len() + 1 + SECRET_LEN + CHECKSUM_LEN);
    key.push_str(prefix);
    key.push_str(client);
    key.push('_');
    key.push_str(&secret);
    let checksum = encode_checksum(crc32fast::hash(key.as_bytes()));
    // Base62 digits are ASCII, so each byte is one char.
    key.extend(checksum.iter().map(|&b| char::from(b)));

    Ok(GeneratedKey { key: SecretString(key), id: KeyId::new(client, &kid), hash: hash_secret(&secret) })
}

/// `len` uniformly random base62 digits from the OS CSPRNG.
///
/// Rejection sampling: a byte is used only if it is below 248 = 4 * 62, so
/// `byte % 62` is uniform (no modulo bias). About 3% of bytes are thrown away.
fn random_base62(len: usize) -> Result<String, KeyFormatError> {
    const LIMIT: u8 = 62 * 4;
    let mut out = String::with_capacity(len);
    let mut pool = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut pool).map_err(|_| KeyFormatError::RandomUnavailable)?;
        for &b in pool.iter().filter(|&&b| b < LIMIT).take(len - out.len()) {
            out.push(char::from(BASE62[usize::from(b % 62)]));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = DEFAULT_PREFIX;

    /// A key built by hand, with a correct checksum, to test parsing apart from generation.
    fn build(prefix: &str, client: &str, secret: &str) -> String {
        let signed = format!("{prefix}{client}_{secret}");
        let checksum = encode_checksum(crc32fast::hash(signed.as_bytes()));
        format!("{signed}{}", std::str::from_utf8(&checksum).unwrap())
    }

    fn secret() -> String {
        "a".repeat(SECRET_LEN)
    }

    #[test]
    fn generated_key_has_the_documented_shape() {
        let g = generate(P, "12345-ABCDE").unwrap();
        let key = g.key.expose();
        assert!(key.starts_with("kg_12345-ABCDE_"), "{key}");
        assert_eq!(key.len(), 3 + 11 + 1 + SECRET_LEN + CHECKSUM_LEN);
        assert!(key["kg_12345-ABCDE_".len()..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(g.id.client(), "12345-ABCDE");
        assert_eq!(g.id.kid().len(), KID_LEN);
        assert!(g.id.as_str().parse::<KeyId>().is_ok(), "the id round-trips through FromStr");
    }

    #[test]
    fn generated_keys_parse_back_to_their_client_and_hash() {
        let g = generate("acme_live_", "c1").unwrap();
        let parsed = parse(g.key.expose(), "acme_live_").unwrap();
        assert_eq!(parsed.client, "c1");
        assert_eq!(parsed.secret.len(), SECRET_LEN);
        assert_eq!(parsed.secret_hash(), g.hash);
    }

    #[test]
    fn two_generated_keys_differ() {
        let (a, b) = (generate(P, "c").unwrap(), generate(P, "c").unwrap());
        assert_ne!(a.key, b.key);
        assert_ne!(a.id, b.id);
        assert_ne!(a.hash, b.hash);
    }

    #[test]
    fn checksum_is_six_zero_padded_base62_digits() {
        assert_eq!(&encode_checksum(0), b"000000");
        assert_eq!(&encode_checksum(61), b"00000z");
        assert_eq!(&encode_checksum(62), b"000010");
        assert_eq!(&encode_checksum(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn hash_secret_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            hash_secret("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parse_refuses_each_malformation_with_its_reason() {
        let good = build(P, "client-1", &secret());
        assert!(parse(&good, P).is_ok());

        let cases: Vec<(String, KeyFormatError)> = vec![
            ("x".repeat(MAX_KEY_LEN + 1), KeyFormatError::TooLong),
            (good.replacen("kg_", "kx_", 1), KeyFormatError::WrongPrefix),
            (String::new(), KeyFormatError::WrongPrefix),
            ("kg_c_abc".into(), KeyFormatError::TooShort),
            (build(P, "client-1", &secret()).replacen("1_", "1-", 1), KeyFormatError::MissingSeparator),
            (build(P, "client-1", &format!("{}!", &secret()[1..])), KeyFormatError::NotBase62),
            (format!("{}000000", &good[..good.len() - 6]), KeyFormatError::BadChecksum),
            (
                build(P, "client_1", &secret()),
                KeyFormatError::InvalidClient("only A-Z a-z 0-9 and - are allowed"),
            ),
            (
                build(P, &"c".repeat(65), &secret()),
                KeyFormatError::InvalidClient("must be at most 64 characters"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse(&input, P).unwrap_err(), want, "{input:?}");
        }
    }

    #[test]
    fn longest_possible_key_is_accepted() {
        let key = build("abcdefghijklmno_", &"c".repeat(MAX_CLIENT_LEN), &secret());
        assert_eq!(key.len(), MAX_KEY_LEN);
        assert!(parse(&key, "abcdefghijklmno_").is_ok());
    }

    #[test]
    fn multibyte_characters_do_not_panic() {
        // 'é' is two bytes: the fixed-length tail split would land inside it.
        let key = format!("kg_c_é{}", "a".repeat(SECRET_LEN + CHECKSUM_LEN - 1));
        assert_eq!(parse(&key, P).unwrap_err(), KeyFormatError::NotBase62);
        let key = format!("kg_cé_{}", "a".repeat(SECRET_LEN + CHECKSUM_LEN));
        assert!(parse(&key, P).is_err());
    }

    #[test]
    fn client_ids_follow_the_contract() {
        for ok in ["a", "12345-ABCDE", "-", &"z".repeat(64)] {
            assert_eq!(validate_client_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a_b", "a.b", "a b", "é", &"z".repeat(65)] {
            assert!(validate_client_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_follow_the_documented_rule() {
        for ok in ["kg_", "a_", "acme_live_", "K9_", &format!("{}_", "p".repeat(15))] {
            assert_eq!(validate_prefix(ok), Ok(()), "{ok}");
        }
        for bad in ["", "_", "kg", "_kg_", "kg-", "k g_", &format!("{}_", "p".repeat(16))] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
        assert!(generate("kg", "c").is_err());
        assert!(generate(P, "bad client").is_err());
    }

    #[test]
    fn secrets_never_reach_debug_or_display() {
        let g = generate(P, "c").unwrap();
        let parsed = parse(g.key.expose(), P).unwrap();
        let secret = parsed.secret;
        for shown in [format!("{g:?}"), format!("{}", g.key), format!("{:?}", g.key), format!("{parsed:?}")] {
            assert!(!shown.contains(secret), "{shown}");
            assert!(!shown.contains(&secret[..8]), "{shown}");
        }
        assert!(format!("{parsed:?}").contains("\"c\""), "the client ID is still shown");
    }

    #[test]
    fn errors_never_contain_key_text() {
        let key = build(P, "visible", &secret());
        let forged = format!("{}000000", &key[..key.len() - 6]);
        let err = parse(&forged, P).unwrap_err();
        assert!(!err.to_string().contains("aaaa"), "{err}");
    }

    /// Enough cases to exercise every branch, few enough to keep `cargo test` fast.
    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, ..ProptestConfig::default() }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn parse_is_total_on_arbitrary_strings(input in "\\PC{0,200}", prefix in "[a-z_]{0,4}") {
            let _ = parse(&input, &prefix);
        }

        #[test]
        fn parse_is_total_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let input = String::from_utf8_lossy(&bytes);
            let _ = parse(&input, P);
            let _ = parse(&input, "");
        }

        #[test]
        fn parse_is_total_near_the_key_shape(
            prefix in "kg_|kx_|", client in "[A-Za-z0-9_é-]{0,70}", sep in "_|-|",
            tail in "[A-Za-z0-9é!]{40,55}",
        ) {
            let _ = parse(&format!("{prefix}{client}{sep}{tail}"), P);
        }

        #[test]
        fn generated_keys_round_trip(client in "[A-Za-z0-9-]{1,64}", prefix in "[A-Za-z0-9][A-Za-z0-9_]{0,14}_") {
            let g = generate(&prefix, &client).unwrap();
            let parsed = parse(g.key.expose(), &prefix).unwrap();
            prop_assert_eq!(parsed.client, client.as_str());
            prop_assert_eq!(hash_secret(parsed.secret), g.hash);
            prop_assert_eq!(g.id.client(), client.as_str());
        }

        #[test]
        fn any_single_character_substitution_is_rejected(
            client in "[A-Za-z0-9-]{1,64}",
            position in any::<prop::sample::Index>(),
            replacement in any::<char>(),
        ) {
            let g = generate(P, &client).unwrap();
            let key = g.key.expose();
            let mut chars: Vec<char> = key.chars().collect();
            let i = position.index(chars.len());
            prop_assume!(chars[i] != replacement);
            chars[i] = replacement;
            let typo: String = chars.into_iter().collect();
            prop_assert!(parse(&typo, P).is_err(), "accepted a key with position {} changed", i);
        }

        #[test]
        fn any_base62_substitution_is_rejected(
            client in "[A-Za-z0-9-]{1,64}",
            position in any::<prop::sample::Index>(),
            replacement in "[A-Za-z0-9_-]",
        ) {
            // Same as above, but with the replacements a person actually mistypes,
            // which keep the key's length and alphabet: only the checksum can tell.
            let g = generate(P, &client).unwrap();
            let mut bytes = g.key.expose().as_bytes().to_vec();
            let i = position.index(bytes.len());
            let replacement = replacement.as_bytes()[0];
            prop_assume!(bytes[i] != replacement);
            bytes[i] = replacement;
            let typo = String::from_utf8(bytes).unwrap();
            prop_assert!(parse(&typo, P).is_err(), "accepted a key with position {} changed", i);
        }

        #[test]
        fn wrong_prefix_is_rejected(client in "[A-Za-z0-9-]{1,64}", other in "[A-Za-z0-9][A-Za-z0-9_]{0,14}_") {
            prop_assume!(other != P);
            let g = generate(P, &client).unwrap();
            prop_assert!(parse(g.key.expose(), &other).is_err());
        }
    }
}
