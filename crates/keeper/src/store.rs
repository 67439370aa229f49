//! The cluster configuration in SQL (MySQL, or SQLite for the embedded
//! default): apps, settings and upstream routes. The same queries run on both.

use std::collections::BTreeMap;

use pushgrid_common::{db, now_ms};
use pushgrid_notify::{Provider, ProviderFields};
use pushgrid_proto::cluster::{App, NotifyProvider, UpstreamRoute};
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};

/// An app as written in the config file and the admin API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct AppSeed {
    pub id: String,
    pub jwt_secret: String,
    pub api_key: String,
    pub webhook_url: String,
    /// Push API requests per second (0 = unlimited) and burst.
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    /// A new login kicks the user's older connections of the same platform.
    pub single_login: bool,
}

/// An upstream route as written in the config file and the admin API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RouteSeed {
    pub app: String,
    pub product: String,
    /// Empty matches every type of the product.
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    pub timeout_ms: u32,
    pub retries: u32,
    pub concurrency: u32,
}

impl Default for RouteSeed {
    fn default() -> Self {
        RouteSeed {
            app: String::new(),
            product: String::new(),
            kind: String::new(),
            url: String::new(),
            timeout_ms: 5000,
            retries: 2,
            concurrency: 64,
        }
    }
}

impl RouteSeed {
    pub fn to_proto(&self) -> UpstreamRoute {
        UpstreamRoute {
            app: self.app.clone(),
            product: self.product.clone(),
            r#type: self.kind.clone(),
            url: self.url.clone(),
            timeout_ms: self.timeout_ms,
            retries: self.retries,
            concurrency: self.concurrency,
        }
    }
}

/// Everything keeper publishes besides membership.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterConfig {
    pub apps: BTreeMap<String, App>,
    pub settings: BTreeMap<String, String>,
    pub routes: Vec<UpstreamRoute>,
    /// Notification provider credentials, by (app, provider).
    pub notify_providers: Vec<NotifyProvider>,
}

/// Problems with apps, each naming the field; empty when all are valid.
pub fn app_problems(app: &AppSeed, prefix: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if app.id.is_empty() || app.id.len() > 64 || app.id.contains(':') {
        problems.push(format!("{prefix}id must be 1 to 64 bytes without ':'"));
    }
    if app.jwt_secret.is_empty() {
        problems.push(format!("{prefix}jwt_secret must not be empty"));
    }
    if app.api_key.is_empty() {
        problems.push(format!("{prefix}api_key must not be empty"));
    }
    if !app.webhook_url.is_empty()
        && !app.webhook_url.starts_with("http://")
        && !app.webhook_url.starts_with("https://")
    {
        problems.push(format!("{prefix}webhook_url must be an http(s) URL"));
    }
    problems
}

pub fn route_problems(route: &RouteSeed, prefix: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if route.app.is_empty() || route.product.is_empty() {
        problems.push(format!("{prefix}app and product are required"));
    }
    if !route.url.starts_with("http://") && !route.url.starts_with("https://") {
        problems.push(format!("{prefix}url must be an http(s) URL"));
    }
    if route.timeout_ms == 0 || route.concurrency == 0 {
        problems.push(format!(
            "{prefix}timeout_ms and concurrency must be above 0"
        ));
    }
    problems
}

/// A statement MySQL chose as a deadlock victim (SQLSTATE 40001, error
/// 1213) or that waited too long for a row lock (1205): it applied nothing.
fn is_lock_conflict(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(database) = error else {
        return false;
    };
    database.code().as_deref() == Some("40001")
        || database.message().contains("Lock wait timeout exceeded")
}

pub struct ConfigStore {
    pool: AnyPool,
}

impl ConfigStore {
    pub async fn connect(url: &str) -> pushgrid_common::StartResult<ConfigStore> {
        let pool = db::connect(url, 8).await?;
        db::migrate(
            &pool,
            sqlx::migrate!("./migrations"),
            "_pushgrid_keeper_migrations",
        )
        .await?;
        Ok(ConfigStore { pool })
    }

    /// Writes a config file's apps, settings and routes. Keepers started
    /// together write the same rows at once, and MySQL may pick one of them
    /// as a deadlock victim (the DELETE before each INSERT takes a gap lock):
    /// a write that lost a lock conflict applied nothing and is tried again,
    /// up to 8 times in all.
    pub async fn seed(
        &self,
        apps: &[AppSeed],
        settings: &BTreeMap<String, String>,
        routes: &[RouteSeed],
    ) -> Result<(), sqlx::Error> {
        let mut tries = 1u64;
        loop {
            let written = async {
                self.put_apps(apps).await?;
                self.put_settings(settings).await?;
                self.put_routes(routes).await
            }
            .await;
            match written {
                Err(error) if tries < 8 && is_lock_conflict(&error) => {
                    tracing::warn!(%error, tries, "writing the configuration lost a lock conflict; trying again");
                    let pause = rand::random_range(10..50u64) * tries;
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Inserts or replaces apps by id.
    pub async fn put_apps(&self, apps: &[AppSeed]) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        for app in apps {
            // The previous secret of a rotation survives a replace.
            let previous = sqlx::query(
                "SELECT previous_jwt_secret, previous_secret_until_ms FROM apps WHERE id = ?",
            )
            .bind(&app.id)
            .fetch_optional(&mut *transaction)
            .await?;
            let (previous_secret, previous_until): (String, i64) = match previous {
                Some(row) => (row.try_get(0)?, row.try_get(1)?),
                None => (String::new(), 0),
            };
            sqlx::query("DELETE FROM apps WHERE id = ?")
                .bind(&app.id)
                .execute(&mut *transaction)
                .await?;
            sqlx::query(
                "INSERT INTO apps (id, jwt_secret, api_key, webhook_url, updated_ms, previous_jwt_secret, \
                 previous_secret_until_ms, rate_per_sec, rate_burst, single_login) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&app.id)
            .bind(&app.jwt_secret)
            .bind(&app.api_key)
            .bind(&app.webhook_url)
            .bind(now_ms() as i64)
            .bind(previous_secret)
            .bind(previous_until)
            .bind(i64::from(app.rate_per_sec))
            .bind(i64::from(app.rate_burst))
            .bind(i64::from(app.single_login))
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Makes `new_secret` the app's secret; the old one stays valid for `overlap_ms`.
    pub async fn rotate_secret(
        &self,
        app: &str,
        new_secret: &str,
        overlap_ms: u64,
    ) -> Result<bool, sqlx::Error> {
        let result = sqlx::query(
            "UPDATE apps SET previous_jwt_secret = jwt_secret, previous_secret_until_ms = ?, jwt_secret = ?, \
             updated_ms = ? WHERE id = ?",
        )
        .bind((now_ms() + overlap_ms) as i64)
        .bind(new_secret)
        .bind(now_ms() as i64)
        .bind(app)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Deletes an app and its notification providers.
    pub async fn delete_app(&self, app: &str) -> Result<bool, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM notify_providers WHERE app = ?")
            .bind(app)
            .execute(&mut *transaction)
            .await?;
        let result = sqlx::query("DELETE FROM apps WHERE id = ?")
            .bind(app)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(result.rows_affected() > 0)
    }

    /// Sets an app's credentials for a provider, replacing what was set;
    /// false when there is no such app.
    pub async fn put_provider(
        &self,
        app: &str,
        provider: Provider,
        fields: &ProviderFields,
    ) -> Result<bool, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        if sqlx::query("SELECT id FROM apps WHERE id = ?")
            .bind(app)
            .fetch_optional(&mut *transaction)
            .await?
            .is_none()
        {
            return Ok(false);
        }
        sqlx::query("DELETE FROM notify_providers WHERE app = ? AND provider = ?")
            .bind(app)
            .bind(provider.as_str())
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "INSERT INTO notify_providers (app, provider, fields, updated_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(app)
        .bind(provider.as_str())
        .bind(fields.to_json())
        .bind(now_ms() as i64)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(true)
    }

    pub async fn delete_provider(
        &self,
        app: &str,
        provider: Provider,
    ) -> Result<bool, sqlx::Error> {
        let result = sqlx::query("DELETE FROM notify_providers WHERE app = ? AND provider = ?")
            .bind(app)
            .bind(provider.as_str())
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// The notification providers, by app and provider. A row this version
    /// cannot read (an unknown provider, fields it does not know) is left
    /// out with a warning rather than failing the whole configuration.
    async fn load_providers(&self) -> Result<Vec<NotifyProvider>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT app, provider, fields, updated_ms FROM notify_providers ORDER BY app, provider",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut providers = Vec::new();
        for row in rows {
            let app: String = row.try_get("app")?;
            let name: String = row.try_get("provider")?;
            let text: String = row.try_get("fields")?;
            let updated_ms = row.try_get::<i64, _>("updated_ms")?.max(0) as u64;
            let parsed = serde_json::from_str::<ProviderFields>(&text);
            match (Provider::parse(&name), parsed) {
                (Some(provider), Ok(fields)) => {
                    providers.push(fields.to_proto(&app, provider, updated_ms));
                }
                _ => tracing::warn!(
                    app,
                    provider = name,
                    "notification provider row not understood; left out"
                ),
            }
        }
        Ok(providers)
    }

    /// Inserts or replaces settings by name.
    pub async fn put_settings(
        &self,
        settings: &BTreeMap<String, String>,
    ) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        for (name, value) in settings {
            sqlx::query("DELETE FROM settings WHERE name = ?")
                .bind(name)
                .execute(&mut *transaction)
                .await?;
            sqlx::query("INSERT INTO settings (name, value, updated_ms) VALUES (?, ?, ?)")
                .bind(name)
                .bind(value)
                .bind(now_ms() as i64)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    pub async fn delete_setting(&self, name: &str) -> Result<bool, sqlx::Error> {
        let result = sqlx::query("DELETE FROM settings WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Inserts or replaces routes by (app, product, type).
    pub async fn put_routes(&self, routes: &[RouteSeed]) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        for route in routes {
            sqlx::query("DELETE FROM routes WHERE app = ? AND product = ? AND type = ?")
                .bind(&route.app)
                .bind(&route.product)
                .bind(&route.kind)
                .execute(&mut *transaction)
                .await?;
            sqlx::query(
                "INSERT INTO routes (app, product, type, url, timeout_ms, retries, concurrency, updated_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&route.app)
            .bind(&route.product)
            .bind(&route.kind)
            .bind(&route.url)
            .bind(i64::from(route.timeout_ms))
            .bind(i64::from(route.retries))
            .bind(i64::from(route.concurrency))
            .bind(now_ms() as i64)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    pub async fn delete_route(
        &self,
        app: &str,
        product: &str,
        kind: &str,
    ) -> Result<bool, sqlx::Error> {
        let result = sqlx::query("DELETE FROM routes WHERE app = ? AND product = ? AND type = ?")
            .bind(app)
            .bind(product)
            .bind(kind)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Reads the whole configuration.
    pub async fn load(&self) -> Result<ClusterConfig, sqlx::Error> {
        let mut config = ClusterConfig::default();
        let rows = sqlx::query(
            "SELECT id, jwt_secret, api_key, webhook_url, previous_jwt_secret, previous_secret_until_ms, \
             rate_per_sec, rate_burst, single_login FROM apps",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let app = App {
                id: row.try_get("id")?,
                jwt_secret: row.try_get("jwt_secret")?,
                api_key: row.try_get("api_key")?,
                webhook_url: row.try_get("webhook_url")?,
                previous_jwt_secret: row.try_get("previous_jwt_secret")?,
                previous_secret_until_ms: row.try_get::<i64, _>("previous_secret_until_ms")?.max(0)
                    as u64,
                rate_per_sec: row.try_get::<i64, _>("rate_per_sec")?.max(0) as u32,
                rate_burst: row.try_get::<i64, _>("rate_burst")?.max(0) as u32,
                single_login: row.try_get::<i64, _>("single_login")? != 0,
            };
            config.apps.insert(app.id.clone(), app);
        }
        for row in sqlx::query("SELECT name, value FROM settings")
            .fetch_all(&self.pool)
            .await?
        {
            config
                .settings
                .insert(row.try_get("name")?, row.try_get("value")?);
        }
        let rows = sqlx::query(
            "SELECT app, product, type, url, timeout_ms, retries, concurrency FROM routes ORDER BY app, product, type",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            config.routes.push(UpstreamRoute {
                app: row.try_get("app")?,
                product: row.try_get("product")?,
                r#type: row.try_get("type")?,
                url: row.try_get("url")?,
                timeout_ms: row.try_get::<i64, _>("timeout_ms")?.max(0) as u32,
                retries: row.try_get::<i64, _>("retries")?.max(0) as u32,
                concurrency: row.try_get::<i64, _>("concurrency")?.max(0) as u32,
            });
        }
        config.notify_providers = self.load_providers().await?;
        Ok(config)
    }

    /// The pool, shared with the lease store.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
