//! The credentials directory on disk: [`init_dir`] creates what is missing,
//! [`rotate`] steps a key rotation, files are written with mode 0600.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pushgrid_proto::cluster::Role;

use super::keys::{RoleKey, Verifiers};
use super::{
    ADMIN_TOKEN_FILE, CredentialError, RELOAD_EVERY, ROLES, SECRET_BYTES, VERIFIERS_FILE, io_error,
    key_file_name, role_name,
};

/// What [`init_dir`] created.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Initialised {
    /// Roles whose key file was created now.
    pub created_keys: Vec<Role>,
    /// Whether the admin token file was created now.
    pub created_admin_token: bool,
}

/// Creates what is missing of a credentials directory: one `<role>.key` per
/// role, the `verifiers` of every key found (keeping verifiers already listed,
/// e.g. during a rotation) and an `admin-token`; the directory has mode 0700
/// and every file 0600. Existing keys are kept, so this runs on every start.
pub fn init_dir(dir: &Path) -> Result<Initialised, CredentialError> {
    create_private_dir(dir)?;
    let mut initialised = Initialised::default();
    let mut verifiers = match std::fs::read_to_string(dir.join(VERIFIERS_FILE)) {
        Ok(text) => Verifiers::parse(&text).map_err(|error| {
            CredentialError::Invalid(format!("{}: {error}", dir.join(VERIFIERS_FILE).display()))
        })?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Verifiers::default(),
        Err(error) => return Err(io_error(&dir.join(VERIFIERS_FILE))(error)),
    };
    let before = verifiers.clone();
    for role in ROLES {
        let path = dir.join(key_file_name(role));
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => RoleKey::parse(&text).map_err(|error| {
                CredentialError::Invalid(format!("{}: {error}", path.display()))
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = RoleKey::generate(role);
                write_private(&path, &format!("{}\n", key.expose()), false)?;
                initialised.created_keys.push(role);
                key
            }
            Err(error) => return Err(io_error(&path)(error)),
        };
        if !verifiers.contains(&key.verifier()) {
            verifiers.list.push(key.verifier());
        }
    }
    if verifiers != before || !dir.join(VERIFIERS_FILE).exists() {
        write_private(&dir.join(VERIFIERS_FILE), &verifiers.to_text(), true)?;
    }
    let admin = dir.join(ADMIN_TOKEN_FILE);
    if !admin.exists() {
        let secret: [u8; SECRET_BYTES] = rand::random();
        write_private(
            &admin,
            &format!("{}\n", URL_SAFE_NO_PAD.encode(secret)),
            false,
        )?;
        initialised.created_admin_token = true;
    }
    Ok(initialised)
}

/// The admin token of a credentials directory, if it has one.
pub fn read_admin_token(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(ADMIN_TOKEN_FILE))
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|token| !token.is_empty())
}

/// A step of a key rotation (see [`rotate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    /// Make `<role>.key.next` and add its verifier: servers accept both keys
    /// once they have read the verifiers again.
    Begin,
    /// `<role>.key.next` becomes `<role>.key` (the old one is kept as
    /// `<role>.key.old`): the role's processes send the new key.
    Switch,
    /// Remove the verifier of `<role>.key.old` and the file: the old key is
    /// refused from now on.
    End,
}

/// One step of rotating `role`'s key in the credentials directory `dir`.
/// Wait at least [`RELOAD_EVERY`] (and until every host has the new files)
/// between steps. Returns what was done, for the operator.
pub fn rotate(dir: &Path, role: Role, step: RotationStep) -> Result<String, CredentialError> {
    let current = dir.join(key_file_name(role));
    let next = dir.join(format!("{}.next", key_file_name(role)));
    let old = dir.join(format!("{}.old", key_file_name(role)));
    let verifiers_path = dir.join(VERIFIERS_FILE);
    let read_key = |path: &Path| -> Result<RoleKey, CredentialError> {
        let text = std::fs::read_to_string(path).map_err(io_error(path))?;
        RoleKey::parse(&text)
            .map_err(|error| CredentialError::Invalid(format!("{}: {error}", path.display())))
    };
    let mut verifiers = Verifiers::parse(
        &std::fs::read_to_string(&verifiers_path).map_err(io_error(&verifiers_path))?,
    )?;
    let name = role_name(role);
    match step {
        RotationStep::Begin => {
            if next.exists() {
                return Err(CredentialError::Invalid(format!(
                    "{} exists: a rotation of {name} has begun; run `switch` next",
                    next.display()
                )));
            }
            let key = RoleKey::generate(role);
            write_private(&next, &format!("{}\n", key.expose()), false)?;
            verifiers.list.push(key.verifier());
            write_private(&verifiers_path, &verifiers.to_text(), true)?;
            Ok(format!(
                "new {name} key in {}; its verifier is in {} (servers accept both keys once they \
                 read it, within {} s); then run `switch`",
                next.display(),
                verifiers_path.display(),
                RELOAD_EVERY.as_secs()
            ))
        }
        RotationStep::Switch => {
            let key = read_key(&next)?;
            if !verifiers.contains(&key.verifier()) {
                return Err(CredentialError::Invalid(format!(
                    "the verifiers do not list the key in {}; run `begin` again",
                    next.display()
                )));
            }
            std::fs::rename(&current, &old).map_err(io_error(&current))?;
            std::fs::rename(&next, &current).map_err(io_error(&next))?;
            Ok(format!(
                "{name} processes send the new key within {} s; the old one is kept in {} until `end`",
                RELOAD_EVERY.as_secs(),
                old.display()
            ))
        }
        RotationStep::End => {
            let retired = read_key(&old)?;
            let current_key = read_key(&current)?;
            verifiers
                .list
                .retain(|verifier| *verifier != retired.verifier());
            if !verifiers.contains(&current_key.verifier()) {
                return Err(CredentialError::Invalid(format!(
                    "the verifiers do not list the key in {}; refusing to leave {name} without one",
                    current.display()
                )));
            }
            write_private(&verifiers_path, &verifiers.to_text(), true)?;
            std::fs::remove_file(&old).map_err(io_error(&old))?;
            Ok(format!(
                "the old {name} key is refused from now on (within {} s)",
                RELOAD_EVERY.as_secs()
            ))
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<(), CredentialError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_error(dir))
}

/// Writes `text` to `path` with mode 0600: a new file (`replace` false: fails
/// when it exists), or replacing it through a temporary file and a rename.
fn write_private(path: &Path, text: &str, replace: bool) -> Result<(), CredentialError> {
    let target = if replace {
        path.with_extension(format!("tmp{:08x}", rand::random::<u32>()))
    } else {
        path.to_path_buf()
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&target).map_err(io_error(&target))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(&target))?;
    if replace {
        std::fs::rename(&target, path).map_err(io_error(path))?;
    }
    Ok(())
}
