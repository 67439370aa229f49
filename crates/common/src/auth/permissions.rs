//! The permission table: which role may call which gRPC method, and the
//! caller's role that a request carries once its key was checked.

use pushgrid_proto::cluster::Role;

use super::ROLES;

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
