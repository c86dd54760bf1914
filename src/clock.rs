//! The wall clock access tokens are signed and checked against, in Unix
//! seconds. The system's in production; tests swap in tokio's, which they
//! can pause and advance, to see a token expire without waiting for it.

#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    #[default]
    System,
    /// `unix_at` at `instant_at`, moving with tokio's clock from there.
    Tokio { unix_at: u64, instant_at: tokio::time::Instant },
}

impl Clock {
    /// Tokio's clock, reading the system's time now. Must run inside a
    /// tokio runtime.
    pub fn tokio() -> Self {
        Self::Tokio { unix_at: Self::System.unix_now(), instant_at: tokio::time::Instant::now() }
    }

    /// Unix seconds now.
    pub fn unix_now(&self) -> u64 {
        match self {
            Self::System => u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0),
            Self::Tokio { unix_at, instant_at } => unix_at
                .saturating_add(tokio::time::Instant::now().saturating_duration_since(*instant_at).as_secs()),
        }
    }

    /// Now, as a timestamp (key expiry is checked against one).
    pub fn timestamp(&self) -> jiff::Timestamp {
        match self {
            Self::System => jiff::Timestamp::now(),
            Self::Tokio { .. } => {
                let secs = i64::try_from(self.unix_now()).unwrap_or(i64::MAX);
                jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::MAX)
            }
        }
    }
}
