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

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use http::header::AUTHORIZATION;
use pushgrid_proto::cluster::Role;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpConnectInfo;

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

/// One role's key: what a process of that role sends on every call.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleKey {
    role: Role,
    text: String,
}

impl fmt::Debug for RoleKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "RoleKey({}, <redacted>)", role_name(self.role))
    }
}

impl RoleKey {
    /// A new random key for `role`.
    pub fn generate(role: Role) -> RoleKey {
        let secret: [u8; SECRET_BYTES] = rand::random();
        RoleKey {
            role,
            text: format!(
                "{KEY_PREFIX}.{}.{}",
                role_name(role),
                URL_SAFE_NO_PAD.encode(secret)
            ),
        }
    }

    /// Reads a key (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<RoleKey, CredentialError> {
        let text = text.trim();
        let shape = || {
            CredentialError::Invalid(format!(
                "not a pushgrid role key (expected {KEY_PREFIX}.<role>.<secret>)"
            ))
        };
        let mut parts = text.split('.');
        let (Some(KEY_PREFIX), Some(role), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(shape());
        };
        let role = role_by_name(role)
            .ok_or_else(|| CredentialError::Invalid(format!("unknown role {role:?} in key")))?;
        match URL_SAFE_NO_PAD.decode(secret) {
            Ok(bytes) if bytes.len() == SECRET_BYTES => {}
            _ => return Err(shape()),
        }
        Ok(RoleKey {
            role,
            text: text.to_string(),
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The key as written in its file and sent on the wire.
    pub fn expose(&self) -> &str {
        &self.text
    }

    pub fn verifier(&self) -> Verifier {
        Verifier {
            role: self.role,
            digest: Sha256::digest(self.text.as_bytes()).into(),
        }
    }
}

/// What a server keeps to recognise one key: its role and SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verifier {
    role: Role,
    digest: [u8; 32],
}

impl Verifier {
    pub fn parse(line: &str) -> Result<Verifier, CredentialError> {
        let line = line.trim();
        let shape = || {
            CredentialError::Invalid(format!(
                "{line:?} is not a verifier (expected {VERIFIER_PREFIX}.<role>.<digest>)"
            ))
        };
        let mut parts = line.split('.');
        let (Some(VERIFIER_PREFIX), Some(role), Some(digest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(shape());
        };
        let role = role_by_name(role).ok_or_else(|| {
            CredentialError::Invalid(format!("unknown role {role:?} in verifier {line:?}"))
        })?;
        let digest: [u8; 32] = URL_SAFE_NO_PAD
            .decode(digest)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(shape)?;
        Ok(Verifier { role, digest })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn to_line(&self) -> String {
        format!(
            "{VERIFIER_PREFIX}.{}.{}",
            role_name(self.role),
            URL_SAFE_NO_PAD.encode(self.digest)
        )
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization: Bearer` header.
    Missing,
    /// Something that is not a role key.
    Malformed,
    /// A well-formed key of `Role` that no verifier accepts.
    Unknown(Role),
    /// A valid key of a role that may not call this method.
    Forbidden(Role),
}

impl Refusal {
    /// The `reason` label of the refusal counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing => "no_credential",
            Refusal::Malformed => "malformed_credential",
            Refusal::Unknown(_) => "unknown_credential",
            Refusal::Forbidden(_) => "forbidden",
        }
    }

    /// The role the credential named, if it named one.
    pub fn caller(&self) -> Option<Role> {
        match self {
            Refusal::Unknown(role) | Refusal::Forbidden(role) => Some(*role),
            Refusal::Missing | Refusal::Malformed => None,
        }
    }

    /// The gRPC status the caller gets: 16 for a missing or wrong key, 7 for a
    /// role outside its rights. The message says which, and what to do.
    pub fn status(&self, server: Role, path: &str) -> tonic::Status {
        let server = role_name(server);
        match self {
            Refusal::Missing => tonic::Status::unauthenticated(format!(
                "pushgrid {server}: no cluster credential; internal calls need \
                 `authorization: Bearer <role key>` (see docs/security.md)"
            )),
            Refusal::Malformed => tonic::Status::unauthenticated(format!(
                "pushgrid {server}: the credential is not a pushgrid role key \
                 ({KEY_PREFIX}.<role>.<secret>)"
            )),
            Refusal::Unknown(role) => tonic::Status::unauthenticated(format!(
                "pushgrid {server}: this {} key is not one the cluster accepts \
                 (not in the verifiers)",
                role_name(*role)
            )),
            Refusal::Forbidden(role) => tonic::Status::permission_denied(format!(
                "pushgrid {server}: a {} may not call {}",
                role_name(*role),
                printable(path)
            )),
        }
    }
}

/// At most 128 characters of what a peer sent, escaped for a log or an answer.
pub fn printable(text: &str) -> String {
    let cut: String = text.chars().take(128).collect();
    let escaped = cut.escape_debug().to_string();
    if cut.len() < text.len() {
        format!("{escaped}...")
    } else {
        escaped
    }
}

/// The keys a server accepts: one or more verifiers per role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verifiers {
    list: Vec<Verifier>,
}

impl Verifiers {
    pub fn new(list: Vec<Verifier>) -> Verifiers {
        Verifiers { list }
    }

    /// One verifier per line; blank lines and `#` comments are skipped. Every
    /// bad line is named in the one error.
    pub fn parse(text: &str) -> Result<Verifiers, CredentialError> {
        let mut list = Vec::new();
        let mut problems = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match Verifier::parse(line) {
                Ok(verifier) => {
                    if !list.contains(&verifier) {
                        list.push(verifier);
                    }
                }
                Err(error) => problems.push(format!("line {}: {error}", number + 1)),
            }
        }
        if !problems.is_empty() {
            return Err(CredentialError::Invalid(problems.join("; ")));
        }
        Ok(Verifiers { list })
    }

    pub fn to_text(&self) -> String {
        let mut text = String::from(
            "# pushgrid cluster verifiers: one line per accepted role key (pgv1.<role>.<sha256>).\n\
             # Not secret: they let a server check keys, not make them.\n",
        );
        for verifier in &self.list {
            text.push_str(&verifier.to_line());
            text.push('\n');
        }
        text
    }

    pub fn list(&self) -> &[Verifier] {
        &self.list
    }

    pub fn contains(&self, verifier: &Verifier) -> bool {
        self.list.contains(verifier)
    }

    /// The role of a presented key: it must be well formed and its digest
    /// equal (compared in constant time) to a verifier of the role it names.
    pub fn check(&self, presented: &str) -> Result<Role, Refusal> {
        let mut parts = presented.splitn(3, '.');
        let (Some(KEY_PREFIX), Some(role), Some(_)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed);
        };
        let role = role_by_name(role).ok_or(Refusal::Malformed)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut matched = false;
        for verifier in self.list.iter().filter(|verifier| verifier.role == role) {
            // No early exit: every verifier of the role is compared.
            matched |= constant_time_eq(&verifier.digest, &digest);
        }
        if matched {
            Ok(role)
        } else {
            Err(Refusal::Unknown(role))
        }
    }
}

/// Equal contents, in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// A set of roles, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleSet(u16);

impl RoleSet {
    pub const NONE: RoleSet = RoleSet(0);

    pub const fn of(roles: &[Role]) -> RoleSet {
        let mut bits = 0u16;
        let mut index = 0;
        while index < roles.len() {
            bits |= 1 << roles[index] as i32;
            index += 1;
        }
        RoleSet(bits)
    }

    pub fn contains(self, role: Role) -> bool {
        self.0 & (1 << role as i32) != 0
    }

    pub fn roles(self) -> impl Iterator<Item = Role> {
        ROLES.into_iter().filter(move |role| self.contains(*role))
    }
}

const EVERY_ROLE: RoleSet = RoleSet::of(&ROLES);
const ROOM: RoleSet = RoleSet::of(&[Role::Room]);
const CENTER: RoleSet = RoleSet::of(&[Role::Center]);

/// The roles that may call the gRPC method `path`: the whole permission
/// table. Every role may use keeper (which further binds a node's role to its
/// caller's key and gives app secrets only to [`sees_app_secrets`] roles);
/// the other services serve exactly the roles that call them. A method not
/// listed here is refused to everyone.
pub fn allowed_callers(path: &str) -> RoleSet {
    if path.starts_with("/pushgrid.cluster.Keeper/") {
        return EVERY_ROLE;
    }
    match path {
        // Sessions come from the rooms that hold the connections.
        "/pushgrid.cluster.Register/Online" | "/pushgrid.cluster.Register/Offline" => ROOM,
        "/pushgrid.cluster.Register/Lookup" => RoleSet::of(&[Role::Center, Role::Coordinator]),
        "/pushgrid.cluster.Register/AppStats" => CENTER,
        // Inbox reads, ACKs, delivery reports and topic history: rooms.
        "/pushgrid.cluster.Saver/Pending"
        | "/pushgrid.cluster.Saver/PendingMany"
        | "/pushgrid.cluster.Saver/Ack"
        | "/pushgrid.cluster.Saver/Delivered"
        | "/pushgrid.cluster.Saver/History" => ROOM,
        // Everything the push API stores or reads: center.
        "/pushgrid.cluster.Saver/Store"
        | "/pushgrid.cluster.Saver/StoreMany"
        | "/pushgrid.cluster.Saver/Publish"
        | "/pushgrid.cluster.Saver/Bind"
        | "/pushgrid.cluster.Saver/Unbind"
        | "/pushgrid.cluster.Saver/GroupMembers"
        | "/pushgrid.cluster.Saver/UserGroups"
        | "/pushgrid.cluster.Saver/StartGroupPush"
        | "/pushgrid.cluster.Saver/StoreChildren"
        | "/pushgrid.cluster.Saver/GroupPushProgress"
        | "/pushgrid.cluster.Saver/MessageStatus"
        | "/pushgrid.cluster.Saver/ListTokens"
        | "/pushgrid.cluster.Saver/RemoveTokens" => CENTER,
        // Device push tokens: from the API (center) and PUSH_TOKEN frames (room).
        "/pushgrid.cluster.Saver/RegisterTokens" => RoleSet::of(&[Role::Center, Role::Room]),
        "/pushgrid.cluster.Room/Deliver" | "/pushgrid.cluster.Room/Broadcast" => CENTER,
        "/pushgrid.cluster.Room/Kick" => RoleSet::of(&[Role::Coordinator]),
        "/pushgrid.cluster.Coordinator/StateChanges" | "/pushgrid.cluster.Coordinator/Upstream" => {
            ROOM
        }
        // The API's kick, and a room's single-login kick.
        "/pushgrid.cluster.Coordinator/Kick" => RoleSet::of(&[Role::Center, Role::Room]),
        "/pushgrid.cluster.Center/BroadcastSubtasks" => CENTER,
        _ => RoleSet::NONE,
    }
}

/// Whether keeper's watch stream gives `role` the apps' JWT secrets and API
/// keys: only the roles that verify device tokens (room) or API keys (center).
pub fn sees_app_secrets(role: Role) -> bool {
    matches!(role, Role::Room | Role::Center)
}

/// The caller's role, put in a request's extensions by [`ClusterAuth`] once
/// its key was checked; handlers read it with
/// `request.extensions().get::<CallerRole>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerRole(pub Role);

/// The caller's role of a request that passed [`ClusterAuth`]. A request
/// without one did not pass the layer: refused.
pub fn caller_role<T>(request: &tonic::Request<T>) -> Result<Role, tonic::Status> {
    request
        .extensions()
        .get::<CallerRole>()
        .map(|caller| caller.0)
        .ok_or_else(|| tonic::Status::unauthenticated("no checked cluster credential"))
}

struct Shared {
    role: Role,
    /// `Bearer <own key>`, marked sensitive (never indexed by HPACK, never
    /// printed by `Debug`).
    header: ArcSwap<HeaderValue>,
    key: ArcSwap<RoleKey>,
    verifiers: ArcSwap<Verifiers>,
    /// The credentials directory the files are read again from.
    dir: Option<PathBuf>,
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
                role: key.role,
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
    if key.role != role {
        return Err(CredentialError::Invalid(format!(
            "{} holds a {} key, not a {} key",
            key_path.display(),
            role_name(key.role),
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

/// A client service that adds the process's key to every request.
#[derive(Clone)]
pub struct WithCredential<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> WithCredential<S> {
    /// The service the key is added in front of.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B> tower::Service<http::Request<B>> for WithCredential<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::clone(&self.shared.header.load()),
        );
        self.inner.call(request)
    }
}

/// Checks the credential and the permission of every call to a gRPC server.
#[derive(Clone)]
pub struct ClusterAuthLayer {
    server: Role,
    shared: Arc<Shared>,
}

impl<S> tower::Layer<S> for ClusterAuthLayer {
    type Service = ClusterAuth<S>;

    fn layer(&self, inner: S) -> ClusterAuth<S> {
        ClusterAuth {
            inner,
            server: self.server,
            shared: self.shared.clone(),
        }
    }
}

/// See [`ClusterAuthLayer`].
#[derive(Clone)]
pub struct ClusterAuth<S> {
    inner: S,
    server: Role,
    shared: Arc<Shared>,
}

impl<S> ClusterAuth<S> {
    /// The caller's role when it may make this call.
    fn admit<B>(&self, request: &http::Request<B>) -> Result<Role, tonic::Status> {
        let path = request.uri().path();
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let verdict = match presented {
            None => Err(Refusal::Missing),
            Some(key) => self.shared.verifiers.load().check(key.trim()),
        }
        .and_then(|caller| {
            if allowed_callers(path).contains(caller) {
                Ok(caller)
            } else {
                Err(Refusal::Forbidden(caller))
            }
        });
        verdict.map_err(|refusal| {
            let peer = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr);
            record_refusal(self.server, path, peer, refusal);
            refusal.status(self.server, path)
        })
    }
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for ClusterAuth<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        >,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        match self.admit(&request) {
            Ok(caller) => {
                request.extensions_mut().insert(CallerRole(caller));
                futures::future::Either::Right(self.inner.call(request))
            }
            Err(status) => {
                futures::future::Either::Left(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// The counter of refused calls of a server role.
fn refused_metric(server: Role) -> &'static str {
    match server {
        Role::Keeper => "pushgrid_keeper_grpc_refused_total",
        Role::Dispatcher => "pushgrid_dispatcher_grpc_refused_total",
        Role::Room => "pushgrid_room_grpc_refused_total",
        Role::Register => "pushgrid_register_grpc_refused_total",
        Role::Saver => "pushgrid_saver_grpc_refused_total",
        Role::Center => "pushgrid_center_grpc_refused_total",
        Role::Coordinator => "pushgrid_coordinator_grpc_refused_total",
        Role::Unspecified => "pushgrid_grpc_refused_total",
    }
}

/// A budget of log lines per second for refusals: a flood of refused calls
/// (a scan, a misconfigured peer) must not flood the log. The metrics count
/// every refusal; the log keeps the first `per_second` of each second and
/// says in the next line it writes how many it skipped.
pub struct RefusalLog {
    per_second: u64,
    window: AtomicU64,
    lines: AtomicU64,
    unlogged: AtomicU64,
}

impl RefusalLog {
    pub const fn new(per_second: u64) -> RefusalLog {
        RefusalLog {
            per_second,
            window: AtomicU64::new(0),
            lines: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// `Some(lines skipped since the last one)` when this refusal may be
    /// logged, `None` when the second's budget is spent.
    pub fn admit(&self) -> Option<u64> {
        let second = crate::now_ms() / 1000;
        if self.window.swap(second, Ordering::Relaxed) != second {
            self.lines.store(0, Ordering::Relaxed);
        }
        if self.lines.fetch_add(1, Ordering::Relaxed) >= self.per_second {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

static GRPC_REFUSALS: RefusalLog = RefusalLog::new(20);

fn record_refusal(server: Role, path: &str, peer: Option<std::net::SocketAddr>, refusal: Refusal) {
    let caller = refusal.caller().map_or("none", role_name);
    metrics::counter!(refused_metric(server), "reason" => refusal.reason(), "caller" => caller)
        .increment(1);
    let Some(unlogged) = GRPC_REFUSALS.admit() else {
        return;
    };
    // No TCP address: a call between roles of one process (`pushgrid dev`).
    let peer = peer.map_or_else(|| "in-process".to_string(), |peer| peer.to_string());
    tracing::warn!(
        server = role_name(server),
        method = %printable(path),
        %peer,
        caller,
        reason = refusal.reason(),
        unlogged_before = unlogged,
        "internal call refused"
    );
}

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
