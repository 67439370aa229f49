//! Keepers started together write their config file's apps into one
//! MariaDB database at once: every one of them gets through (a write that
//! MySQL chose as a deadlock victim is tried again), and each app is stored
//! once. Found by `loadtest cluster-faults` at 50,000 devices, where one of
//! the two keepers exited at start with `1213 Deadlock found` (each app's
//! DELETE takes a gap lock where the app is not stored yet, and two
//! keepers' INSERTs then wait for each other's gap).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use pushgrid_keeper::{AppSeed, ConfigStore};
use sqlx::Row;

const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";
const KEEPERS: usize = 8;
/// Rounds of new apps (a new gap each round), written by every keeper at once.
const ROUNDS: usize = 10;
const APPS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_starting_together_all_write_their_apps() {
    let name = format!("pg_e2e_seed_{:08x}", rand::random::<u32>());
    let url = format!("{MYSQL_SERVER}/{name}");
    let mut stores = Vec::new();
    for _ in 0..KEEPERS {
        stores.push(Arc::new(ConfigStore::connect(&url).await.unwrap()));
    }
    let settings = BTreeMap::from([("room:heartbeat_secs".to_owned(), "30".to_owned())]);
    let mut failed = Vec::new();
    let mut wanted = Vec::new();
    for round in 0..ROUNDS {
        let apps: Vec<AppSeed> = (0..APPS)
            .map(|index| AppSeed {
                id: format!("app-{round}-{index}"),
                jwt_secret: format!("secret-{index}"),
                api_key: format!("key-{round}-{index}"),
                ..Default::default()
            })
            .collect();
        wanted.extend(apps.iter().map(|app| app.id.clone()));
        let writers: Vec<_> = stores
            .iter()
            .map(|store| {
                let (store, apps, settings) = (store.clone(), apps.clone(), settings.clone());
                tokio::spawn(async move { store.seed(&apps, &settings, &[]).await })
            })
            .collect();
        for writer in writers {
            if let Err(error) = writer.await.unwrap() {
                failed.push(format!("round {round}: {error:#}"));
            }
        }
    }
    let rows = sqlx::query("SELECT id FROM apps ORDER BY id")
        .fetch_all(stores[0].pool())
        .await
        .unwrap();
    let ids: Vec<String> = rows.iter().map(|row| row.try_get("id").unwrap()).collect();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS `{name}`"
    )))
    .execute(stores[0].pool())
    .await;
    for store in &stores {
        store.close().await;
    }
    assert!(
        failed.is_empty(),
        "keepers that could not write their apps: {failed:?}"
    );
    wanted.sort();
    assert_eq!(ids, wanted, "each app stored once");
}
