//! Configuration: serde structs with defaults, then a TOML file, then the
//! environment (`PUSHGRID_<ROLE>__KEY`, `__` separating nested keys), then
//! `--set key=value` flags, in that order.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Settings every role has: who it is, where it listens and where keeper is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Unique node id; generated (`<role>-<random>`) when empty.
    pub node_id: String,
    /// Address of a keeper's gRPC server.
    pub keeper: String,
    /// This node's gRPC listen address.
    pub listen: String,
    /// `/metrics` and `/healthz` listen address.
    pub admin_listen: String,
    /// Host other nodes and devices should use to reach this node; defaults to
    /// the listener's IP (which must then not be a wildcard address).
    pub advertise_host: String,
    /// Keeper lease TTL; the node heartbeats three times per TTL.
    pub lease_ttl_secs: u32,
    /// Log as JSON lines instead of human text.
    pub log_json: bool,
    /// Free-form labels published with the node, e.g. `region`, `net`, `isp`
    /// (the dispatcher matches devices to rooms by them).
    pub labels: std::collections::BTreeMap<String, String>,
}

impl NodeConfig {
    /// Defaults with the given gRPC and admin ports on loopback.
    pub fn with_ports(grpc_port: u16, admin_port: u16) -> NodeConfig {
        NodeConfig {
            node_id: String::new(),
            keeper: "127.0.0.1:7000".into(),
            listen: format!("127.0.0.1:{grpc_port}"),
            admin_listen: format!("127.0.0.1:{admin_port}"),
            advertise_host: String::new(),
            lease_ttl_secs: 10,
            log_json: false,
            labels: Default::default(),
        }
    }

    /// The node id, generating one for `role` if none was configured.
    pub fn resolved_node_id(&self, role: &str) -> String {
        if self.node_id.is_empty() {
            format!("{role}-{:08x}", rand::random::<u32>())
        } else {
            self.node_id.clone()
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig::with_ports(0, 0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

/// Loads a role's configuration: defaults, then `file`, then the environment,
/// then `overrides` (`key=value`, the value parsed as TOML when it parses,
/// else taken as a string). Every bad key is reported in the one error.
pub fn load<T>(role: &str, file: Option<&Path>, overrides: &[String]) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file(path));
    }
    let prefix = format!("PUSHGRID_{}__", role.to_uppercase());
    figment = figment.merge(Env::prefixed(&prefix).split("__"));
    for entry in overrides {
        let Some((key, raw)) = entry.split_once('=') else {
            return Err(ConfigError(format!("--set {entry:?}: expected key=value")));
        };
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut table| table.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        figment = figment.merge(Serialized::global(key.trim(), value));
    }
    figment.extract::<T>().map_err(|errors| {
        let all: Vec<String> = errors.into_iter().map(|error| error.to_string()).collect();
        ConfigError(all.join("; "))
    })
}

/// Renders an effective configuration as TOML for `--print-config`.
pub fn render<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).unwrap_or_else(|error| format!("# cannot render: {error}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct Sample {
        #[serde(flatten)]
        node: NodeConfig,
        limit: u32,
        name: String,
    }

    #[test]
    fn overrides_beat_the_file() {
        let dir = std::env::temp_dir().join(format!("pgcfg-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "limit = 5\nname = \"file\"\nkeeper = \"10.0.0.1:7000\"\n",
        )
        .unwrap();
        let sample: Sample = load(
            "sampletest",
            Some(&file),
            &["limit=9".into(), "listen=127.0.0.1:1".into()],
        )
        .unwrap();
        assert_eq!(sample.limit, 9);
        assert_eq!(sample.name, "file");
        assert_eq!(sample.node.keeper, "10.0.0.1:7000");
        assert_eq!(sample.node.listen, "127.0.0.1:1");
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let error = load::<Sample>("sampletest", None, &["limit=\"many\"".into()]).unwrap_err();
        assert!(error.to_string().contains("limit"), "{error}");
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let error =
            load::<Sample>("sampletest", Some(Path::new("/nonexistent/x.toml")), &[]).unwrap_err();
        assert!(error.to_string().contains("does not exist"), "{error}");
    }
}
