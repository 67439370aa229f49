//! One process's credentials: its own key and the verifiers it accepts, read
//! from a credentials directory and read again while the process runs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use pushgrid_proto::cluster::Role;
use tokio_util::sync::CancellationToken;

use super::keys::{RoleKey, Verifiers};
use super::layer::{ClusterAuthLayer, WithCredential};
use super::{CredentialError, RELOAD_EVERY, VERIFIERS_FILE, key_file_name, role_name};

pub(super) struct Shared {
    pub(super) role: Role,
    /// `Bearer <own key>`, marked sensitive (never indexed by HPACK, never
    /// printed by `Debug`).
    pub(super) header: ArcSwap<HeaderValue>,
    pub(super) key: ArcSwap<RoleKey>,
    pub(super) verifiers: ArcSwap<Verifiers>,
    /// The credentials directory the files are read again from.
    pub(super) dir: Option<PathBuf>,
}

/// One process role's credentials: its own key (sent) and the verifiers
/// (checked). Cheap to clone.
#[derive(Clone)]
pub struct Credentials {
    shared: Arc<Shared>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Credentials")
            .field("role", &role_name(self.shared.role))
            .field("dir", &self.shared.dir)
            .field("verifiers", &self.shared.verifiers.load().list.len())
            .finish()
    }
}

fn bearer(key: &RoleKey) -> HeaderValue {
    let mut value = HeaderValue::try_from(format!("Bearer {}", key.expose()))
        .expect("a role key is base64url text, a valid header value");
    value.set_sensitive(true);
    value
}

impl Credentials {
    /// Credentials held in memory (tests, tools).
    pub fn new(key: RoleKey, verifiers: Verifiers) -> Credentials {
        Credentials::build(key, verifiers, None)
    }

    fn build(key: RoleKey, verifiers: Verifiers, dir: Option<PathBuf>) -> Credentials {
        Credentials {
            shared: Arc::new(Shared {
                role: key.role(),
                header: ArcSwap::from_pointee(bearer(&key)),
                key: ArcSwap::from_pointee(key),
                verifiers: ArcSwap::from_pointee(verifiers),
                dir,
            }),
        }
    }

    /// The credentials of a node of `role` whose `credentials_dir` setting is
    /// `dir`. Empty: an error that says what to set (a role never runs
    /// without credentials).
    pub fn for_node(role: Role, dir: &str) -> Result<Credentials, CredentialError> {
        if dir.trim().is_empty() {
            let name = role_name(role);
            return Err(CredentialError::Invalid(format!(
                "no cluster credentials: set credentials_dir (--set credentials_dir=DIR or \
                 PUSHGRID_{}__CREDENTIALS_DIR) to a directory holding {} and {VERIFIERS_FILE}; \
                 create one with `pushgrid credentials init DIR` (docs/security.md)",
                name.to_uppercase(),
                key_file_name(role),
            )));
        }
        Credentials::load(role, Path::new(dir.trim()))
    }

    /// Reads `<dir>/<role>.key` and `<dir>/verifiers`.
    pub fn load(role: Role, dir: &Path) -> Result<Credentials, CredentialError> {
        let (key, verifiers) = read_files(role, dir)?;
        if verifiers.list.is_empty() {
            tracing::warn!(dir = %dir.display(), "the verifiers file lists no key: every internal call will be refused");
        }
        Ok(Credentials::build(key, verifiers, Some(dir.to_path_buf())))
    }

    pub fn role(&self) -> Role {
        self.shared.role
    }

    /// `Bearer <own key>`, the value of the `authorization` header.
    pub fn header(&self) -> HeaderValue {
        HeaderValue::clone(&self.shared.header.load())
    }

    /// The key this process sends.
    pub fn key(&self) -> Arc<RoleKey> {
        self.shared.key.load_full()
    }

    pub fn verifiers(&self) -> Arc<Verifiers> {
        self.shared.verifiers.load_full()
    }

    /// Reads the files again; `Ok(true)` when something changed. A file that
    /// does not parse leaves the credentials in force unchanged.
    pub fn reload(&self) -> Result<bool, CredentialError> {
        let Some(dir) = &self.shared.dir else {
            return Ok(false);
        };
        let (key, verifiers) = read_files(self.shared.role, dir)?;
        let mut changed = false;
        if **self.shared.key.load() != key {
            self.shared.header.store(Arc::new(bearer(&key)));
            self.shared.key.store(Arc::new(key));
            changed = true;
        }
        if **self.shared.verifiers.load() != verifiers {
            self.shared.verifiers.store(Arc::new(verifiers));
            changed = true;
        }
        Ok(changed)
    }

    /// Reads the files again every [`RELOAD_EVERY`] until `shutdown`, logging
    /// each change (and each file that no longer parses).
    pub fn spawn_reload(&self, shutdown: CancellationToken) {
        if self.shared.dir.is_none() {
            return;
        }
        let credentials = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let reading = credentials.clone();
                let reloaded = tokio::task::spawn_blocking(move || reading.reload()).await;
                match reloaded {
                    Ok(Ok(true)) => tracing::info!(
                        role = role_name(credentials.role()),
                        verifiers = credentials.verifiers().list.len(),
                        "cluster credentials reloaded"
                    ),
                    Ok(Ok(false)) => {}
                    Ok(Err(error)) => tracing::warn!(
                        %error,
                        "cannot read the cluster credentials again; keeping the ones in force"
                    ),
                    Err(error) => tracing::warn!(%error, "credential reload task failed"),
                }
            }
        });
    }

    /// `inner` with this process's key on every request.
    pub fn attach<S>(&self, inner: S) -> WithCredential<S> {
        WithCredential {
            inner,
            shared: self.shared.clone(),
        }
    }

    /// The layer that checks every call to a gRPC server of role `server`.
    pub fn server_layer(&self, server: Role) -> ClusterAuthLayer {
        ClusterAuthLayer {
            server,
            shared: self.shared.clone(),
        }
    }
}

fn read_files(role: Role, dir: &Path) -> Result<(RoleKey, Verifiers), CredentialError> {
    let key_path = dir.join(key_file_name(role));
    let key_text = std::fs::read_to_string(&key_path).map_err(|source| {
        CredentialError::Invalid(format!(
            "cannot read this role's cluster key {}: {source} (create the credentials with \
             `pushgrid credentials init {}`)",
            key_path.display(),
            dir.display()
        ))
    })?;
    warn_if_readable_by_others(&key_path);
    let key = RoleKey::parse(&key_text)
        .map_err(|error| CredentialError::Invalid(format!("{}: {error}", key_path.display())))?;
    if key.role() != role {
        return Err(CredentialError::Invalid(format!(
            "{} holds a {} key, not a {} key",
            key_path.display(),
            role_name(key.role()),
            role_name(role)
        )));
    }
    let verifiers_path = dir.join(VERIFIERS_FILE);
    let verifiers_text = std::fs::read_to_string(&verifiers_path).map_err(|source| {
        CredentialError::Invalid(format!(
            "cannot read the cluster verifiers {}: {source}",
            verifiers_path.display()
        ))
    })?;
    let verifiers = Verifiers::parse(&verifiers_text).map_err(|error| {
        CredentialError::Invalid(format!("{}: {error}", verifiers_path.display()))
    })?;
    Ok((key, verifiers))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path)
        && metadata.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", metadata.permissions().mode() & 0o777),
            "a cluster key file is readable by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}
