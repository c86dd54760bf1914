//! The exit codes of every `keygate` command, and the one mapping from the
//! commands' errors to them. Scripts branch on these, so each failure a
//! command can meet is given one of them here and nowhere else.
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | the command was right but failed while running: the store or Redis unreachable or erroring, output not writable, a key whose state forbids the operation (rotating a revoked key) |
//! | 2 | usage or configuration error, found before anything changed: a bad flag or flag value (clap's own errors exit 2 too), an invalid or missing config file, an unparsable `--redis`, an `--expires` in the past, `keys update` with nothing to change, a command the configured store cannot serve (`keys audit` and `usage` need Redis) |
//! | 3 | not found: no key with the given ID or key string, no client record with the given ID |

use std::process::ExitCode;

use super::keys::CliError;
use crate::ops::OpsError;
use crate::store::StoreError;

/// One row of the table in the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success,
    Failure,
    Usage,
    NotFound,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::Failure => 1,
            Self::Usage => 2,
            Self::NotFound => 3,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

impl CliError {
    /// The exit code this error ends a `keys` command with.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Ops(error) => ops_exit(error),
            Self::NothingToChange | Self::NeedsRedis(_) | Self::Usage(_) => Exit::Usage,
            Self::Io { .. } | Self::Audit(_) => Exit::Failure,
        }
    }
}

/// Exhaustive on purpose: a new operation error must pick its code.
fn ops_exit(error: &OpsError) -> Exit {
    match error {
        OpsError::NotFound(_) | OpsError::UnknownKey | OpsError::ClientNotFound(_) => Exit::NotFound,
        OpsError::Invalid { .. } => Exit::Usage,
        // The command was right; the record's state forbids it.
        OpsError::NotUsable { .. } | OpsError::ClientExists(_) | OpsError::ClientRevoked(_) => Exit::Failure,
        OpsError::Store(error) => match error {
            StoreError::NotFound(_) | StoreError::ClientNotFound(_) => Exit::NotFound,
            StoreError::Unavailable(_)
            | StoreError::Corrupt { .. }
            | StoreError::AlreadyExists(_)
            | StoreError::ClientExists(_) => Exit::Failure,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_code() {
        let id: crate::key::KeyId = "acme.k1".parse().unwrap();
        assert_eq!(CliError::Ops(OpsError::NotFound(id.clone())).exit(), Exit::NotFound);
        assert_eq!(CliError::Ops(OpsError::UnknownKey).exit(), Exit::NotFound);
        let invalid = OpsError::Invalid { field: "expires".into(), reason: "in the past".into() };
        assert_eq!(CliError::Ops(invalid).exit(), Exit::Usage);
        assert_eq!(CliError::NothingToChange.exit(), Exit::Usage);
        assert_eq!(CliError::NeedsRedis("audit").exit(), Exit::Usage);
        let down = OpsError::Store(StoreError::Unavailable("down".into()));
        assert_eq!(CliError::Ops(down).exit(), Exit::Failure);
        assert_eq!(CliError::Ops(OpsError::NotUsable { id, why: "revoked" }).exit(), Exit::Failure);
        assert_eq!([Exit::Success, Exit::Failure, Exit::Usage, Exit::NotFound].map(Exit::code), [0, 1, 2, 3]);
    }
}
