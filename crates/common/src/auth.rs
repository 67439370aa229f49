//! Cluster credentials: every internal gRPC call carries its caller's role
//! key, and every gRPC server checks the key, and what that role may call,
//! before any handler runs.
//!
//! * A **role key** is `pgk1.<role>.<secret>` (32 random bytes, base64url).
//!   A process sends its own role's key as `authorization: Bearer <key>` on
//!   every call ([`WithCredential`], applied once where channels are made).
//! * A **verifier** is `pgv1.<role>.<SHA-256 of the key>`. Servers hold only
//!   verifiers (the `verifiers` file, one line per accepted key; two lines for
//!   one role while its key is rotated), never other roles' keys: a room
//!   process can check a center's calls but cannot call as a center.
//! * [`allowed_callers`] is the one table of which role may call which
//!   method. [`ClusterAuthLayer`] answers UNAUTHENTICATED (16) to a call
//!   without a valid key and PERMISSION_DENIED (7) to a role calling outside
//!   its row, counts the refusal and logs it with the caller's address.
//!
//! The check is one SHA-256 of a 53-byte key (one compression block), a
//! constant-time comparison per verifier of the named role and a `match` on
//! the method path; `examples/credential_check.rs` measures it.
//!
//! `pushgrid credentials init DIR` ([`init_dir`]) writes one `<role>.key` per
//! role, the `verifiers` and an `admin-token`, each with mode 0600; a role is
//! pointed at such a directory with `credentials_dir`. The key and verifier
//! files are read again every few seconds ([`Credentials::spawn_reload`]), so
//! a key is rotated without a restart ([`rotate`], docs/security.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use pushgrid_proto::cluster::Role;

mod credentials;
mod files;
mod keys;
mod layer;
mod permissions;
mod refusal;

pub use self::credentials::Credentials;
pub use self::files::{Initialised, RotationStep, init_dir, read_admin_token, rotate};
pub use self::keys::{RoleKey, Verifier, Verifiers, constant_time_eq};
pub use self::layer::{ClusterAuth, ClusterAuthLayer, WithCredential};
pub use self::permissions::{CallerRole, RoleSet, allowed_callers, caller_role, sees_app_secrets};
pub use self::refusal::{Refusal, RefusalLog, printable};

/// The prefix of a role key: `pgk1.<role>.<secret>`.
pub const KEY_PREFIX: &str = "pgk1";
/// The prefix of a verifier: `pgv1.<role>.<sha256 of the key>`.
pub const VERIFIER_PREFIX: &str = "pgv1";
/// The file of a credentials directory holding the verifiers.
pub const VERIFIERS_FILE: &str = "verifiers";
/// The file of a credentials directory holding the admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// How often [`Credentials::spawn_reload`] reads the files again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

const SECRET_BYTES: usize = 32;

/// Every role that holds a key, in the order files are written.
pub const ROLES: [Role; 7] = [
    Role::Keeper,
    Role::Register,
    Role::Saver,
    Role::Coordinator,
    Role::Center,
    Role::Dispatcher,
    Role::Room,
];

/// The lower-case name of a role, as in key files and metrics.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Keeper => "keeper",
        Role::Dispatcher => "dispatcher",
        Role::Room => "room",
        Role::Register => "register",
        Role::Saver => "saver",
        Role::Center => "center",
        Role::Coordinator => "coordinator",
        Role::Unspecified => "unspecified",
    }
}

/// The role named `name` (`room`, `center`, ...).
pub fn role_by_name(name: &str) -> Option<Role> {
    ROLES.into_iter().find(|role| role_name(*role) == name)
}

/// `<role>.key`: the file of a credentials directory with that role's key.
pub fn key_file_name(role: Role) -> String {
    format!("{}.key", role_name(role))
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{0}")]
    Invalid(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialError + '_ {
    move |source| CredentialError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("pgauth-{:08x}", rand::random::<u32>()))
    }

    #[test]
    fn keys_and_verifiers_round_trip() {
        let key = RoleKey::generate(Role::Room);
        assert!(key.expose().starts_with("pgk1.room."));
        assert_eq!(key.expose().len(), "pgk1.room.".len() + 43);
        assert_eq!(
            RoleKey::parse(&format!(" {}\n", key.expose())).unwrap(),
            key
        );
        let verifier = key.verifier();
        assert_eq!(Verifier::parse(&verifier.to_line()).unwrap(), verifier);
        assert!(!format!("{key:?}").contains(&key.expose()[10..]));
        for bad in [
            "",
            "pgk1.room",
            "pgk2.room.AAAA",
            "pgk1.nobody.AAAA",
            "pgk1.room.short",
        ] {
            assert!(RoleKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_key_is_accepted_only_by_its_own_verifier() {
        let room = RoleKey::generate(Role::Room);
        let center = RoleKey::generate(Role::Center);
        let verifiers = Verifiers::new(vec![room.verifier(), center.verifier()]);
        assert_eq!(verifiers.check(room.expose()), Ok(Role::Room));
        assert_eq!(verifiers.check(center.expose()), Ok(Role::Center));
        // The room's secret presented as a center key: the digest differs.
        let forged = room.expose().replace("pgk1.room.", "pgk1.center.");
        assert_eq!(
            verifiers.check(&forged),
            Err(Refusal::Unknown(Role::Center))
        );
        let stranger = RoleKey::generate(Role::Saver);
        assert_eq!(
            verifiers.check(stranger.expose()),
            Err(Refusal::Unknown(Role::Saver))
        );
        assert_eq!(verifiers.check("hello"), Err(Refusal::Malformed));
        assert_eq!(verifiers.check("pgk1.god.xyz"), Err(Refusal::Malformed));
        let mut last_byte_changed = room.expose().to_string();
        let last = last_byte_changed.pop().unwrap();
        last_byte_changed.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(
            verifiers.check(&last_byte_changed),
            Err(Refusal::Unknown(Role::Room))
        );
    }

    #[test]
    fn the_permission_table_names_who_calls_what() {
        let may = |path: &str, role: Role| allowed_callers(path).contains(role);
        assert!(may("/pushgrid.cluster.Saver/Ack", Role::Room));
        assert!(!may("/pushgrid.cluster.Saver/Ack", Role::Center));
        assert!(!may("/pushgrid.cluster.Saver/Store", Role::Room));
        assert!(may("/pushgrid.cluster.Room/Deliver", Role::Center));
        assert!(!may("/pushgrid.cluster.Room/Deliver", Role::Coordinator));
        assert!(may("/pushgrid.cluster.Register/Online", Role::Room));
        assert!(!may("/pushgrid.cluster.Register/Online", Role::Center));
        for role in ROLES {
            assert!(may("/pushgrid.cluster.Keeper/Watch", role));
            assert!(!may("/pushgrid.cluster.Saver/Nope", role));
            assert!(!may("/other.Service/Call", role));
        }
        assert!(sees_app_secrets(Role::Room) && sees_app_secrets(Role::Center));
        assert!(!sees_app_secrets(Role::Saver) && !sees_app_secrets(Role::Dispatcher));
    }

    #[test]
    fn refusals_say_what_was_wrong_with_the_grpc_code() {
        let status = Refusal::Missing.status(Role::Saver, "/pushgrid.cluster.Saver/Ack");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().contains("no cluster credential"),
            "{status:?}"
        );
        let status =
            Refusal::Forbidden(Role::Room).status(Role::Saver, "/pushgrid.cluster.Saver/Store");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "pushgrid saver: a room may not call /pushgrid.cluster.Saver/Store"
        );
        let status = Refusal::Forbidden(Role::Room).status(Role::Saver, "/x\n\0y");
        assert!(status.message().ends_with("/x\\n\\0y"), "{status:?}");
    }

    #[test]
    fn init_creates_private_files_once_and_rotation_accepts_two_keys_then_one() {
        let dir = temp_dir();
        let first = init_dir(&dir).unwrap();
        assert_eq!(first.created_keys.len(), ROLES.len());
        assert!(first.created_admin_token);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for name in ["room.key", VERIFIERS_FILE, ADMIN_TOKEN_FILE] {
                let mode = std::fs::metadata(dir.join(name))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{name}");
            }
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        let again = init_dir(&dir).unwrap();
        assert_eq!(
            again,
            Initialised::default(),
            "a second start keeps everything"
        );
        assert!(read_admin_token(&dir).is_some());

        let room = Credentials::load(Role::Room, &dir).unwrap();
        let saver = Credentials::load(Role::Saver, &dir).unwrap();
        let old_key = room.key();
        assert_eq!(saver.verifiers().check(old_key.expose()), Ok(Role::Room));
        assert_eq!(saver.verifiers().list().len(), ROLES.len());

        rotate(&dir, Role::Room, RotationStep::Begin).unwrap();
        assert!(rotate(&dir, Role::Room, RotationStep::Begin).is_err());
        assert!(saver.reload().unwrap());
        let next =
            RoleKey::parse(&std::fs::read_to_string(dir.join("room.key.next")).unwrap()).unwrap();
        assert_eq!(saver.verifiers().check(old_key.expose()), Ok(Role::Room));
        assert_eq!(saver.verifiers().check(next.expose()), Ok(Role::Room));

        rotate(&dir, Role::Room, RotationStep::Switch).unwrap();
        assert!(room.reload().unwrap());
        assert_eq!(*room.key(), next);
        assert!(room.header().is_sensitive());

        rotate(&dir, Role::Room, RotationStep::End).unwrap();
        assert!(saver.reload().unwrap());
        assert_eq!(
            saver.verifiers().check(old_key.expose()),
            Err(Refusal::Unknown(Role::Room))
        );
        assert_eq!(saver.verifiers().check(next.expose()), Ok(Role::Room));
        assert!(!dir.join("room.key.old").exists());
        // init after a rotation keeps the new key and adds nothing.
        assert_eq!(init_dir(&dir).unwrap(), Initialised::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_role_without_credentials_is_told_what_to_set() {
        let error = Credentials::for_node(Role::Saver, "")
            .unwrap_err()
            .to_string();
        assert!(error.contains("set credentials_dir"), "{error}");
        assert!(error.contains("PUSHGRID_SAVER__CREDENTIALS_DIR"), "{error}");
        assert!(error.contains("pushgrid credentials init"), "{error}");
        let error = Credentials::for_node(Role::Saver, "/nonexistent/pg")
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/pg/saver.key"), "{error}");
        // A key of the wrong role in the file.
        let dir = temp_dir();
        init_dir(&dir).unwrap();
        std::fs::copy(dir.join("room.key"), dir.join("saver.key")).unwrap();
        let error = Credentials::load(Role::Saver, &dir)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("holds a room key, not a saver key"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_verifier_lines_are_all_named() {
        let error = Verifiers::parse("# comment\n\nnope\npgv1.room.AAAA\npgv1.who.AAAA\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 3"), "{error}");
        assert!(error.contains("line 4"), "{error}");
        assert!(error.contains("line 5"), "{error}");
    }
}
