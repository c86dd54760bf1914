//! `keygate tokens ...`: the signing key ring of access tokens in the
//! store (`signing`): list its keys, rotate to a new one.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::exit::Exit;
use super::table::{self, Align};
use crate::config::TokensConfig;
use crate::signing::{self, KeyState, Ring, RingStore};

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// List the signing keys: which one signs, which waits to, which are
    /// retired and until when their tokens are still accepted.
    Keys {
        /// One JSON object (the ring, without the private keys).
        #[arg(long)]
        json: bool,
    },
    /// Add a signing key that signs from a publish delay on; the one
    /// signing now keeps being accepted until its last token has expired.
    RotateKey {
        /// How long the new key is published before it signs: at least
        /// twice `[tokens] key_refresh` (every gateway re-reads the ring
        /// within one, an upstream caching the JWKS within another).
        /// Default: twice `key_refresh`.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        publish_delay: Option<Duration>,
    },
}

/// Runs `cmd` on `store` under the `[tokens]` policy of the config.
pub async fn run(cmd: TokensCommand, store: &dyn RingStore, config: &TokensConfig) -> ExitCode {
    if let Some(file) = &config.signing_key {
        eprintln!(
            "error: tokens.signing_key is set ({}): this config signs with that file, not the store's \
             ring; replace the file and reload to change it",
            file.display()
        );
        return ExitCode::from(Exit::Usage);
    }
    let now = crate::clock::Clock::System.unix_now();
    let grace = config.access_ttl + config.leeway;
    let (mut out, mut err) = (io::stdout(), io::stderr());
    let done = match cmd {
        TokensCommand::Keys { json } => match store.load().await {
            Ok(Some(ring)) => print_ring(&ring, now, grace, json, &mut out),
            Ok(None) => {
                eprintln!("error: {}", signing::RingError::Missing);
                return ExitCode::from(Exit::NotFound);
            }
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(Exit::Failure);
            }
        },
        TokensCommand::RotateKey { publish_delay } => {
            let least = config.key_refresh * 2;
            let delay = publish_delay.unwrap_or(least);
            if delay < least {
                eprintln!(
                    "error: --publish-delay {} is shorter than twice tokens.key_refresh ({}): a gateway \
                     or an upstream that has not re-read the keys yet would refuse the new key's tokens",
                    humantime::format_duration(delay),
                    humantime::format_duration(least)
                );
                return ExitCode::from(Exit::Usage);
            }
            match signing::rotate(store, now, delay, grace).await {
                Ok(ring) => {
                    let new = ring.keys.last().map_or("", |key| key.kid.as_str());
                    let at = timestamp(now + delay.as_secs());
                    let _ =
                        writeln!(err, "Rotated: key {new} signs from {at} (ring version {}).", ring.version);
                    print_ring(&ring, now, grace, false, &mut out)
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    let missing = matches!(error, signing::RingError::Missing);
                    return ExitCode::from(if missing { Exit::NotFound } else { Exit::Failure });
                }
            }
        }
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write output: {error}");
            ExitCode::from(Exit::Failure)
        }
    }
}

fn state_name(state: KeyState) -> String {
    match state {
        KeyState::Next => "next".to_owned(),
        KeyState::Signing => "signing".to_owned(),
        KeyState::Retired { accepted_until } => {
            format!("retired, accepted until {}", timestamp(accepted_until))
        }
        KeyState::Expired => "expired".to_owned(),
    }
}

fn timestamp(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| unix.to_string(), |t| t.to_string())
}

fn print_ring(ring: &Ring, now: u64, grace: Duration, json: bool, out: &mut impl Write) -> io::Result<()> {
    let states: Vec<KeyState> = (0..ring.keys.len()).map(|i| ring.state_of(i, now, grace)).collect();
    if json {
        let keys: Vec<serde_json::Value> = ring
            .keys
            .iter()
            .zip(&states)
            .map(|(key, state)| {
                let accepted_until = match state {
                    KeyState::Retired { accepted_until } => Some(*accepted_until),
                    _ => None,
                };
                serde_json::json!({
                    "kid": key.kid,
                    "alg": key.alg,
                    "created": key.created,
                    "signs_from": key.signs_from,
                    "state": match state {
                        KeyState::Next => "next",
                        KeyState::Signing => "signing",
                        KeyState::Retired { .. } => "retired",
                        KeyState::Expired => "expired",
                    },
                    "accepted_until": accepted_until,
                })
            })
            .collect();
        serde_json::to_writer(&mut *out, &serde_json::json!({ "version": ring.version, "keys": keys }))?;
        return writeln!(out);
    }
    let rows: Vec<Vec<String>> = ring
        .keys
        .iter()
        .zip(&states)
        .map(|(key, state)| {
            vec![key.kid.clone(), key.alg.clone(), timestamp(key.signs_from), state_name(*state)]
        })
        .collect();
    let align = [Align::Left, Align::Left, Align::Left, Align::Left];
    table::write(out, &["KID", "ALG", "SIGNS FROM", "STATE"], &rows, &align)
}
