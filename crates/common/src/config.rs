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
    /// Keeper gRPC addresses: one, or several separated by commas
    /// (`10.0.0.1:7000,10.0.0.2:7000`). Calls move on to the next keeper when
    /// one does not answer; keepers the view lists are added.
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
    /// Directory with this role's cluster key (`<role>.key`) and the
    /// `verifiers` of every role's keys (`pushgrid credentials init DIR`).
    /// Required: a role without it refuses to start.
    pub credentials_dir: String,
    /// Bearer token of the admin endpoints (`/debug/` on the admin port,
    /// keeper's admin API, center's dashboard, a room's drain). Empty: the
    /// `PUSHGRID_ADMIN_TOKEN` variable, else the `admin-token` file of
    /// `credentials_dir`; with none of them those endpoints answer 403.
    pub admin_token: String,
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
            credentials_dir: String::new(),
            admin_token: String::new(),
        }
    }

    /// The admin token in force: `admin_token`, else `PUSHGRID_ADMIN_TOKEN`,
    /// else the `admin-token` file of `credentials_dir`.
    pub fn admin_token(&self) -> Option<String> {
        let configured = self.admin_token.trim();
        if !configured.is_empty() {
            return Some(configured.to_string());
        }
        if let Some(token) = crate::telemetry::admin_token_from_env() {
            return Some(token.to_string());
        }
        if self.credentials_dir.trim().is_empty() {
            return None;
        }
        crate::auth::read_admin_token(Path::new(self.credentials_dir.trim()))
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
pub struct ConfigError(pub(crate) String);

/// Loads a role's configuration: defaults, then `file`, then the environment,
/// then `overrides` (`key=value`, the value parsed as TOML when it parses,
/// else taken as a string). Every bad key is reported in the one error: keys
/// the role does not know (with the nearest known key as a hint) and values
/// of the wrong type, each with where it came from.
pub fn load<T>(role: &str, file: Option<&Path>, overrides: &[String]) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    // JSON keeps `None` fields as null, so optional keys count as known.
    let known = serde_json::to_value(T::default())
        .map_err(|error| ConfigError(format!("cannot describe the defaults: {error}")))?;
    let mut problems = Vec::new();
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError(format!(
                "cannot read config file {}: {error}",
                path.display()
            ))
        })?;
        let table: toml::Table = text.parse().map_err(|error| {
            ConfigError(format!(
                "config file {} is not valid TOML: {error}",
                path.display()
            ))
        })?;
        let source = format!("in {}", path.display());
        for key in unknown_keys(&toml::Value::Table(table), &known, "") {
            problems.push(unknown_key_problem(&key, &known, &source));
        }
        figment = figment.merge(Toml::file(path));
    }
    let prefix = format!("PUSHGRID_{}__", role.to_uppercase());
    let env = Env::prefixed(&prefix).split("__");
    for (key, _) in env.iter() {
        let key = key.as_str().to_string();
        if unknown_path(&key, &known) {
            let variable = format!("{prefix}{}", key.to_uppercase().replace('.', "__"));
            problems.push(unknown_key_problem(
                &key,
                &known,
                &format!("from {variable}"),
            ));
        }
    }
    figment = figment.merge(env);
    for entry in overrides {
        let Some((key, raw)) = entry.split_once('=') else {
            return Err(ConfigError(format!("--set {entry:?}: expected key=value")));
        };
        let key = key.trim();
        if unknown_path(key, &known) {
            problems.push(unknown_key_problem(key, &known, "from --set"));
        }
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut table| table.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        figment = figment.merge(Serialized::global(key, value));
    }
    if problems.is_empty()
        && let Ok(config) = figment.extract::<T>()
    {
        return Ok(config);
    }
    problems.extend(type_problems::<T>(&figment, &known));
    if problems.is_empty() {
        // Not pinned to one key: report what figment says.
        if let Err(errors) = figment.extract::<T>() {
            problems.extend(errors.into_iter().map(|error| error.to_string()));
        }
    }
    Err(ConfigError(problems.join("; ")))
}

/// Dotted paths in `given` that `known` (the serialized defaults) has no
/// place for. An empty table in `known` is a free-form map (e.g. `labels`).
fn unknown_keys(given: &toml::Value, known: &serde_json::Value, prefix: &str) -> Vec<String> {
    let (toml::Value::Table(table), serde_json::Value::Object(fields)) = (given, known) else {
        return Vec::new();
    };
    if fields.is_empty() {
        return Vec::new();
    }
    let mut unknown = Vec::new();
    for (name, value) in table {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match fields.get(name) {
            None => unknown.push(path),
            Some(field) => unknown.extend(unknown_keys(value, field, &path)),
        }
    }
    unknown
}

/// Whether a dotted `path` names no setting in `known`.
fn unknown_path(path: &str, known: &serde_json::Value) -> bool {
    let mut node = known;
    for segment in path.split('.') {
        match node {
            serde_json::Value::Object(fields) if fields.is_empty() => return false,
            serde_json::Value::Object(fields) => match fields.get(segment) {
                Some(field) => node = field,
                None => return true,
            },
            // Optional settings (null) and values take no nested keys we can check.
            serde_json::Value::Null => return false,
            _ => return true,
        }
    }
    false
}

fn unknown_key_problem(path: &str, known: &serde_json::Value, source: &str) -> String {
    let parent = path.rsplit_once('.').map(|(parent, _)| parent);
    let leaf = path.rsplit('.').next().unwrap_or(path);
    let siblings = match parent {
        None => Some(known),
        Some(parent) => parent
            .split('.')
            .try_fold(known, |node, segment| node.get(segment)),
    };
    let hint = siblings
        .and_then(serde_json::Value::as_object)
        .and_then(|fields| {
            fields
                .keys()
                .map(|name| (edit_distance(name, leaf), name))
                .filter(|(distance, name)| *distance <= 2.max(name.len() / 3))
                .min()
        })
        .map(|(_, name)| format!(" (did you mean {name:?}?)"))
        .unwrap_or_default();
    format!("unknown key {path:?} {source}{hint}")
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, char_a) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, char_b) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(char_a != *char_b);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Checks each top-level key alone over the defaults, so that every key with
/// a bad value is named (serde stops at the first).
fn type_problems<T>(figment: &Figment, known: &serde_json::Value) -> Vec<String>
where
    T: Serialize + DeserializeOwned + Default,
{
    let Some(fields) = known.as_object() else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    for name in fields.keys() {
        let Ok(value) = figment.find_value(name) else {
            continue;
        };
        let source = match figment.find_metadata(name) {
            // Still the default: nothing a user gave.
            Some(metadata) if metadata.name == std::any::type_name::<T>() => continue,
            Some(metadata) if metadata.name == std::any::type_name::<toml::Value>() => {
                " (from --set)".to_string()
            }
            Some(metadata) => match &metadata.source {
                Some(figment::Source::File(path)) => format!(" (in {})", path.display()),
                _ if metadata.name.contains("environment") => {
                    let prefix = metadata.name.split('`').nth(1).unwrap_or("PUSHGRID_*__");
                    format!(" (from {prefix}{})", name.to_uppercase())
                }
                _ => format!(" (from {})", metadata.name),
            },
            None => String::new(),
        };
        let alone = Figment::from(Serialized::defaults(T::default()))
            .merge(Serialized::global(name, value));
        if let Err(error) = alone.extract::<T>() {
            let path = if error.path.is_empty() {
                name.clone()
            } else {
                error.path.join(".")
            };
            problems.push(format!("key {path:?}: {}{source}", error.kind));
        }
    }
    problems
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
    fn every_unknown_and_mistyped_key_is_named_at_once() {
        let dir = std::env::temp_dir().join(format!("pgcfg-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "limt = 5\nname = 3\nkeeper = \"10.0.0.1:7000\"\nbogus = true\n[labels]\nregion = \"eu\"\n",
        )
        .unwrap();
        let error = load::<Sample>(
            "sampletest",
            Some(&file),
            &["lease_ttl_secs=\"soon\"".into(), "nope.deep=1".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("unknown key \"limt\""), "{error}");
        assert!(error.contains("did you mean \"limit\""), "{error}");
        assert!(error.contains("unknown key \"bogus\""), "{error}");
        assert!(
            error.contains("unknown key \"nope.deep\" from --set"),
            "{error}"
        );
        assert!(error.contains("key \"name\""), "{error}");
        assert!(error.contains("key \"lease_ttl_secs\""), "{error}");
        assert!(
            !error.contains("labels"),
            "labels is a free-form map: {error}"
        );
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let error =
            load::<Sample>("sampletest", Some(Path::new("/nonexistent/x.toml")), &[]).unwrap_err();
        assert!(error.to_string().contains("does not exist"), "{error}");
    }
}
