//! Why a call was refused: the gRPC status the caller gets, the counter of
//! refusals and the rate-limited log line about them.

use std::sync::atomic::{AtomicU64, Ordering};

use pushgrid_proto::cluster::Role;

use super::{KEY_PREFIX, role_name};

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

pub(super) fn record_refusal(
    server: Role,
    path: &str,
    peer: Option<std::net::SocketAddr>,
    refusal: Refusal,
) {
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
