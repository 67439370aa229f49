//! Generated code for pushgrid's two protobuf packages.
//!
//! * [`client`]: the bodies of device frames (see `crates/wire` for the 12-byte header).
//! * [`cluster`]: the internal tonic services the roles speak to each other.

#[allow(clippy::all, missing_docs)]
pub mod client {
    tonic::include_proto!("pushgrid.client");
}

#[allow(clippy::all, missing_docs)]
pub mod cluster {
    tonic::include_proto!("pushgrid.cluster");
}

/// A provider's credentials print without their secrets (`private_key`,
/// `client_secret`), so no `{:?}` of a cluster state can log them.
impl std::fmt::Debug for cluster::NotifyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyProvider")
            .field("app", &self.app)
            .field("provider", &self.provider)
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("client_id", &self.client_id)
            .field("base_url", &self.base_url)
            .field("token_url", &self.token_url)
            .field("updated_ms", &self.updated_ms)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn provider_secrets_stay_out_of_debug() {
        let provider = super::cluster::NotifyProvider {
            app: "demo".into(),
            private_key: "-----BEGIN PRIVATE KEY-----".into(),
            client_secret: "s3cret".into(),
            ..Default::default()
        };
        let state = super::cluster::ClusterState {
            notify_providers: vec![provider],
            ..Default::default()
        };
        let printed = format!("{state:?}");
        assert!(printed.contains("demo"), "{printed}");
        assert!(
            !printed.contains("PRIVATE") && !printed.contains("s3cret"),
            "{printed}"
        );
    }
}
