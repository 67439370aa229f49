//! Leases and fenced worker ids in keeper's database, against MariaDB and
//! SQLite: two keepers (two stores on one database) never grant one worker
//! id twice, an id comes back only after its lease and the margin, its
//! holder keeps it across a lost lease, and expired leases leave the list.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use pushgrid_keeper::ConfigStore;
use pushgrid_keeper::leases::{LeaseStore, WorkerPolicy, WorkerRequest};
use pushgrid_proto::cluster::{NodeInfo, Role};

const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

#[derive(Clone, Copy)]
enum Backend {
    Mysql,
    Sqlite,
}

struct Keepers {
    stores: Vec<LeaseStore>,
    configs: Vec<ConfigStore>,
    cleanup: Option<String>,
    dir: Option<std::path::PathBuf>,
}

impl Keepers {
    /// `count` keepers' lease stores on one fresh database.
    async fn start(backend: Backend, count: usize, policy: WorkerPolicy) -> Keepers {
        let name = format!("pg_e2e_leases_{:08x}", rand::random::<u32>());
        let (url, cleanup, dir) = match backend {
            Backend::Mysql => (format!("{MYSQL_SERVER}/{name}"), Some(name), None),
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(&name);
                (
                    format!("sqlite://{}", dir.join("keeper.db").display()),
                    None,
                    Some(dir),
                )
            }
        };
        let mut stores = Vec::new();
        let mut configs = Vec::new();
        for _ in 0..count {
            let config = ConfigStore::connect(&url).await.unwrap();
            stores.push(LeaseStore::new(
                config.pool().clone(),
                matches!(backend, Backend::Sqlite),
                policy,
            ));
            configs.push(config);
        }
        Keepers {
            stores,
            configs,
            cleanup,
            dir,
        }
    }

    async fn finish(self) {
        if let Some(database) = &self.cleanup {
            let drop = format!("DROP DATABASE IF EXISTS `{database}`");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(self.configs[0].pool())
                .await;
        }
        for config in &self.configs {
            config.close().await;
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn saver(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.to_string(),
        role: Role::Saver as i32,
        grpc_addr: format!("127.0.0.1:{}", 1000 + id.len()),
        ..Default::default()
    }
}

fn wants() -> WorkerRequest {
    WorkerRequest {
        wanted: true,
        ..Default::default()
    }
}

/// Waits until the database's clock passes `until_ms`.
async fn until_db_time(store: &LeaseStore, until_ms: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.db_now_ms().await.unwrap() <= until_ms {
        assert!(tokio::time::Instant::now() < deadline, "the clock moves");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn two_keepers_never_grant_one_worker_id_twice(backend: Backend) {
    let keepers = Keepers::start(
        backend,
        2,
        WorkerPolicy {
            ttl_ms: 60_000,
            margin_ms: 1000,
        },
    )
    .await;
    let calls = (0..40).map(|index| {
        let store = &keepers.stores[index % 2];
        async move {
            store
                .register(&saver(&format!("saver-{index}")), 10_000, wants())
                .await
        }
    });
    let granted: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|registered| registered.unwrap().worker.unwrap())
        .collect();
    let ids: HashSet<u32> = granted.iter().map(|grant| grant.id).collect();
    assert_eq!(ids.len(), 40, "every saver got an id of its own");
    assert!(granted.iter().all(|grant| grant.generation == 1));
    let rows = keepers.stores[1].worker_ids().await.unwrap();
    assert_eq!(rows.len(), 40);
    let holders: HashSet<&str> = rows.iter().map(|row| row.1.as_str()).collect();
    assert_eq!(holders.len(), 40, "one holder per id");
    // Both keepers list the same 40 nodes.
    let (first, _) = keepers.stores[0].live_nodes().await.unwrap();
    let (second, _) = keepers.stores[1].live_nodes().await.unwrap();
    assert_eq!(first.len(), 40);
    assert_eq!(first, second);
    keepers.finish().await;
}

async fn a_worker_id_comes_back_only_after_its_lease_and_the_margin(backend: Backend) {
    let policy = WorkerPolicy {
        ttl_ms: 1000,
        margin_ms: 1000,
    };
    let keepers = Keepers::start(backend, 2, policy).await;
    let (a, b) = (&keepers.stores[0], &keepers.stores[1]);
    let first = a.register(&saver("a"), 500, wants()).await.unwrap();
    let held = first.worker.unwrap();
    let granted_at = a.db_now_ms().await.unwrap();
    // a stops renewing. Expired but inside the margin: the id is not free.
    until_db_time(a, granted_at + policy.ttl_ms + 100).await;
    let inside = b.register(&saver("b"), 500, wants()).await.unwrap();
    assert_ne!(
        inside.worker.unwrap().id,
        held.id,
        "given out inside the margin"
    );
    // Past the margin: granted again, under a new generation.
    until_db_time(b, granted_at + policy.ttl_ms + policy.margin_ms + 100).await;
    let later = b
        .register(
            &saver("c"),
            10_000,
            WorkerRequest {
                wanted: true,
                preferred: Some(held.id),
                generation: 0,
            },
        )
        .await
        .unwrap();
    let regranted = later.worker.unwrap();
    assert_eq!(regranted.id, held.id);
    assert_eq!(regranted.generation, held.generation + 1);
    // The old holder's lease is renewed (no keeper deleted it yet), but not
    // the worker id it lost; and its generation no longer fits: registering
    // again, it gets another id.
    let stale = a.heartbeat(first.lease_id, 0).await.unwrap().unwrap();
    assert!(
        !stale.worker_renewed,
        "the old holder renewed an id it lost"
    );
    let back = a
        .register(
            &saver("a"),
            500,
            WorkerRequest {
                wanted: true,
                preferred: Some(held.id),
                generation: held.generation,
            },
        )
        .await
        .unwrap();
    assert_ne!(back.worker.unwrap().id, held.id, "two holders of one id");
    // The new holder renews it.
    let renewed = b.heartbeat(later.lease_id, 0).await.unwrap().unwrap();
    assert!(renewed.worker_renewed);
    keepers.finish().await;
}

async fn a_holder_keeps_its_id_across_a_lost_lease(backend: Backend) {
    let keepers = Keepers::start(
        backend,
        1,
        WorkerPolicy {
            ttl_ms: 60_000,
            margin_ms: 5000,
        },
    )
    .await;
    let store = &keepers.stores[0];
    let first = store.register(&saver("s"), 300, wants()).await.unwrap();
    let held = first.worker.unwrap();
    let now = store.db_now_ms().await.unwrap();
    until_db_time(store, now + 400).await;
    assert_eq!(store.reap().await.unwrap(), ["s"]);
    assert!(store.live_nodes().await.unwrap().0.is_empty());
    assert!(store.heartbeat(first.lease_id, 0).await.unwrap().is_none());
    let again = store
        .register(
            &saver("s"),
            10_000,
            WorkerRequest {
                wanted: true,
                preferred: Some(held.id),
                generation: held.generation,
            },
        )
        .await
        .unwrap();
    assert_eq!(again.worker, Some(held), "same id, same generation");
    let renewed = store.heartbeat(again.lease_id, 7).await.unwrap().unwrap();
    assert!(renewed.worker_renewed);
    let (nodes, longest_ttl_ms) = store.live_nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(longest_ttl_ms, 10_000);
    assert_eq!((nodes[0].worker_id, nodes[0].load), (held.id, 7));
    // A lease without a worker id renews without one.
    let room = NodeInfo {
        role: Role::Room as i32,
        ..saver("room")
    };
    let plain = store
        .register(&room, 10_000, WorkerRequest::default())
        .await
        .unwrap();
    assert!(plain.worker.is_none());
    assert!(
        !store
            .heartbeat(plain.lease_id, 0)
            .await
            .unwrap()
            .unwrap()
            .worker_renewed
    );
    // Leaving frees the worker id (after the margin) and the node leaves the list.
    assert_eq!(
        store.deregister(again.lease_id).await.unwrap().as_deref(),
        Some("s")
    );
    let rows = store.worker_ids().await.unwrap();
    let row = rows.iter().find(|row| row.0 == held.id).unwrap();
    assert!(row.3 <= store.db_now_ms().await.unwrap());
    assert_eq!(store.live_nodes().await.unwrap().0.len(), 1);
    keepers.finish().await;
}

macro_rules! on_backends {
    ($($test:ident),* $(,)?) => {
        mod mysql {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::Mysql).await;
            })*
        }
        mod sqlite {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::Sqlite).await;
            })*
        }
    };
}

on_backends!(
    two_keepers_never_grant_one_worker_id_twice,
    a_worker_id_comes_back_only_after_its_lease_and_the_margin,
    a_holder_keeps_its_id_across_a_lost_lease,
);
