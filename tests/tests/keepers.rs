//! No single point of failure in keeper: several keepers serve one cluster
//! (leases and worker ids live in MySQL), any of them can die, all of them
//! can be away for longer than a lease without devices or pushes noticing,
//! and worker ids stay fenced: a saver paused past its lease never mints an
//! id another saver was given meanwhile.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushgrid_client::{Client, ClientConfig, Event};
use pushgrid_e2e::{
    ClusterOptions, MYSQL_SERVER, REDIS_URL, TestCluster, eventually, metric, spawn, wait_for,
};
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{Role, StoreRequest};
use serde_json::json;
use sqlx::Row;

/// Answered pushes: message id -> (user, payload).
type Ledger = Arc<Mutex<HashMap<u64, (String, String)>>>;

/// A push load: where it goes and what it recorded.
struct Load {
    http: reqwest::Client,
    center: String,
    key: String,
    ledger: Ledger,
    refused: AtomicU64,
    stop: AtomicBool,
}

impl Load {
    fn new(cluster: &TestCluster) -> Arc<Load> {
        Arc::new(Load {
            http: cluster.http.clone(),
            center: cluster.center_url(),
            key: cluster.app.api_key.clone(),
            ledger: Ledger::default(),
            refused: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }
}

/// Pushes to `users` in turn until the load stops, recording every 2xx answer.
async fn pusher(load: Arc<Load>, users: Vec<String>, tag: &'static str) {
    let mut step = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        let user = users[step % users.len()].clone();
        let payload = format!("{tag}-{step}");
        let answer = load
            .http
            .post(format!("{}/api/push", load.center))
            .header("Authorization", format!("apikey {}", load.key))
            .timeout(Duration::from_secs(15))
            .json(&json!({ "users": [user], "payload": payload }))
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => {
                let body: serde_json::Value = response.json().await.unwrap();
                let id = body["result"]["messages"][0]["id"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let earlier = load.ledger.lock().unwrap().insert(id, (user, payload));
                assert!(earlier.is_none(), "id {id} answered twice: {earlier:?}");
            }
            _ => {
                load.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        step += 1;
        // Paces the load: about 50 calls a second per pusher.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (worker id, holder, generation, expires ms) rows, and the database's clock.
async fn worker_ids(cluster: &TestCluster) -> (Vec<(u32, String, i64, i64)>, i64) {
    let pool = cluster.mysql().await.unwrap();
    let rows = sqlx::query("SELECT worker_id, holder, generation, expires_ms FROM worker_ids")
        .fetch_all(&pool)
        .await
        .unwrap();
    let now: i64 = sqlx::query("SELECT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) AS now_ms")
        .fetch_one(&pool)
        .await
        .unwrap()
        .try_get("now_ms")
        .unwrap();
    pool.close().await;
    let rows = rows
        .iter()
        .map(|row| {
            (
                row.try_get::<i64, _>("worker_id").unwrap() as u32,
                row.try_get("holder").unwrap(),
                row.try_get("generation").unwrap(),
                row.try_get("expires_ms").unwrap(),
            )
        })
        .collect();
    (rows, now)
}

/// The live worker id row of `holder`.
fn held_by(rows: &[(u32, String, i64, i64)], holder: &str, now: i64) -> Option<(u32, i64)> {
    rows.iter()
        .find(|row| row.1 == holder && row.3 > now)
        .map(|row| (row.0, row.2))
}

/// The state letter of a process (`R`, `S`, `T` for stopped, ...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`; comm may hold spaces, so read after the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    // A process this test started.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// The worker-id race: two savers mint ids under a steady push load; keeper
/// is killed and restarted; then saver A is paused (SIGSTOP) past its worker
/// lease and the margin, a new saver C is started and is given A's worker id
/// (generation + 1), and A is resumed with a Store call waiting for it. A
/// refuses to mint with the id it lost, takes another, and no two messages
/// ever share an id: every id answered 2xx is stored once, with the payload
/// of the push it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_messages_share_an_id_across_a_keeper_restart_and_a_saver_paused_past_its_lease() {
    let mut cluster = TestCluster::start(ClusterOptions {
        keeper_sets: vec![
            "worker_lease_secs=3".into(),
            "worker_id_margin_ms=1000".into(),
            "lease_poll_ms=200".into(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let database = format!("{MYSQL_SERVER}/{}", cluster.database);
    let base_args = cluster.saver_args(REDIS_URL, &database);
    let saver_args = |name: &str| {
        let mut args = base_args.clone();
        args.extend(["--set".into(), format!("node_id={name}")]);
        args
    };
    let _saver_b = spawn(&cluster.dir, "saver-b", "saver", &saver_args("saver-b"))
        .await
        .unwrap();

    let load = Load::new(&cluster);
    let users: Vec<String> = (0..8).map(|index| format!("race-{index}")).collect();
    let mut pushers = Vec::new();
    for tag in ["a", "b", "c"] {
        pushers.push(tokio::spawn(pusher(load.clone(), users.clone(), tag)));
    }
    // The load's steady period before the fault: time passing under load,
    // not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // keeper dies and comes back: nothing it knew is lost.
    cluster.restart_keeper().await.unwrap();
    let (a_id, a_generation) = wait_for(Duration::from_secs(10), || async {
        let (rows, now) = worker_ids(&cluster).await;
        held_by(&rows, "saver-b", now)?;
        held_by(&rows, "saver", now)
    })
    .await
    .expect("savers A and B hold worker ids after the keeper restart");

    // Pause A past its worker lease; a Store call waits in its socket.
    let a_pid = cluster.saver.pid();
    let a_grpc = cluster.saver.addr("grpc");
    let mut a_client = SaverClient::new(cluster.grpc_as(a_grpc, Role::Center).await);
    signal(a_pid, nix::sys::signal::Signal::SIGSTOP);
    // The stop takes effect when each of A's threads is next scheduled: a
    // call A took before that is minted under its valid lease.
    let stopped = eventually(Duration::from_secs(5), || async {
        process_state(a_pid) == Some('T')
    })
    .await;
    assert!(stopped, "saver A stopped");
    let waiting_request = StoreRequest {
        app: cluster.app.id.clone(),
        users: vec!["race-direct".into()],
        payload: "sent while A was paused".into(),
        ..Default::default()
    };
    let waiting = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(30), a_client.store(waiting_request)).await
    });
    // Until A's id is free (its expiry plus the margin), then saver C.
    let free = eventually(Duration::from_secs(20), || async {
        let (rows, now) = worker_ids(&cluster).await;
        rows.iter()
            .any(|row| row.0 == a_id && row.1 == "saver" && row.3 + 1000 < now)
    })
    .await;
    assert!(free, "A's worker id expired while A was paused");
    let _saver_c = spawn(&cluster.dir, "saver-c", "saver", &saver_args("saver-c"))
        .await
        .unwrap();
    let (rows, now) = worker_ids(&cluster).await;
    assert_eq!(
        held_by(&rows, "saver-c", now),
        Some((a_id, a_generation + 1)),
        "C was given A's worker id under the next generation: the race is on ({rows:?})"
    );
    // C serves the load under the id for a while before A wakes (the race's
    // second half: a duration of the scenario, not a wait for a condition).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A resumes: the call that waited is refused (its lease lapsed), or, when
    // A registered again first, answered under its new worker id; never under
    // the id C holds now.
    signal(a_pid, nix::sys::signal::Signal::SIGCONT);
    let answer = waiting.await.unwrap().expect("A answered after it resumed");
    let worker_of = |id: u64| ((id >> 12) & 1023) as u32;
    let waited = match answer {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("worker id"), "{status:?}");
            let refusals = metric(
                cluster.saver.addr("admin"),
                "pushgrid_saver_no_worker_id_total",
                "",
            )
            .await;
            assert!(refusals >= 1.0);
            "refused (its worker id lease had lapsed)".to_string()
        }
        Ok(stored) => {
            let id = stored.into_inner().messages[0].id;
            assert_ne!(
                worker_of(id),
                a_id,
                "A minted with the worker id C holds now"
            );
            format!("answered under A's new worker id {}", worker_of(id))
        }
    };
    let regranted = eventually(Duration::from_secs(20), || async {
        let (rows, now) = worker_ids(&cluster).await;
        held_by(&rows, "saver", now).is_some_and(|(id, _)| id != a_id)
    })
    .await;
    assert!(regranted, "A was given another worker id");
    let a_client = SaverClient::new(cluster.grpc_as(a_grpc, Role::Center).await);
    let mut direct = Vec::new();
    for index in 0..20 {
        let request = StoreRequest {
            app: cluster.app.id.clone(),
            users: vec!["race-direct".into()],
            payload: format!("direct-{index}").into(),
            ..Default::default()
        };
        // keeper's table shows A's new id before A has read the answer that
        // grants it: until then A answers UNAVAILABLE ("retry"), as it must.
        let answered = wait_for(Duration::from_secs(20), || {
            let (mut client, request) = (a_client.clone(), request.clone());
            async move {
                match client.store(request).await {
                    Err(status) if status.code() == tonic::Code::Unavailable => None,
                    answer => Some(answer),
                }
            }
        })
        .await;
        let stored = match answered {
            Some(Ok(stored)) => stored.into_inner(),
            Some(Err(status)) => panic!("A refused a direct store: {status}"),
            None => panic!("A still holds no worker id after 20 s"),
        };
        direct.push((stored.messages[0].id, format!("direct-{index}")));
    }
    // The load's steady period under the new state, before it stops: time
    // passing under load, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop.store(true, Ordering::Relaxed);
    for task in pushers {
        task.await.unwrap();
    }

    // No two messages share an id, and each is the message it answered for.
    let ledger = load.ledger.lock().unwrap().clone();
    let mut expected: HashMap<u64, String> = ledger
        .iter()
        .map(|(id, (_, payload))| (*id, payload.clone()))
        .collect();
    for (id, payload) in &direct {
        assert!(
            expected.insert(*id, payload.clone()).is_none(),
            "id {id} answered twice"
        );
    }
    let pool = cluster.mysql().await.unwrap();
    let rows = sqlx::query("SELECT id, payload FROM messages WHERE app = ?")
        .bind(cluster.app.id.clone())
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    let stored: HashMap<u64, String> = rows
        .iter()
        .map(|row| {
            (
                row.try_get::<i64, _>("id").unwrap() as u64,
                String::from_utf8(row.try_get::<Vec<u8>, _>("payload").unwrap()).unwrap(),
            )
        })
        .collect();
    for (id, payload) in &expected {
        assert_eq!(
            stored.get(id),
            Some(payload),
            "message {id} is not the one answered"
        );
    }
    let workers: HashSet<u32> = expected.keys().map(|id| worker_of(*id)).collect();
    println!(
        "RACE answered {} ids ({} pushes, {} direct to A), all distinct and stored with their own payload; \
         refused {}; worker ids used {workers:?}; A held {a_id} (generation {a_generation}), C was given it \
         (generation {}); the call that waited for A was {waited}",
        expected.len(),
        ledger.len(),
        direct.len(),
        load.refused.load(Ordering::Relaxed),
        a_generation + 1,
    );
    assert!(ledger.len() > 50, "the load ran: {} pushes", ledger.len());
    cluster.cleanup().await;
}

/// Two keepers: one is killed and the cluster carries on through the other
/// (a new room registers, every node follows the surviving keeper); then the
/// other is killed too and both stay away for several lease TTLs: connected
/// devices keep receiving, pushes keep being accepted, a device connects.
/// Both keepers come back and every node is listed again. Every accepted push
/// reached its device exactly once; none was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_dies_then_every_keeper_is_away_and_devices_and_pushes_carry_on() {
    let mut cluster = TestCluster::start(ClusterOptions {
        keepers: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let seen: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let app = cluster.app.clone();
    let start_device = |user: &str, room: String| {
        let mut config = ClientConfig::new(app.token(user), format!("{user}-phone"));
        config.addrs = vec![room];
        config.auto_ack = true;
        config.reconnect_backoff_min = Duration::from_millis(100);
        config.reconnect_backoff_max = Duration::from_millis(500);
        let (client, mut events) = Client::start(config);
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::Push(push) = event {
                    *seen.lock().unwrap().entry(push.msg_id).or_default() += 1;
                }
            }
        });
        client
    };
    let first = start_device("kay", cluster.room_addr(0));
    let load = Load::new(&cluster);
    let pushing = tokio::spawn(pusher(load.clone(), vec!["kay".into()], "k"));
    // The load's steady period before the fault: time passing under load,
    // not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // One keeper dies: a new room registers through the other one.
    cluster.kill_keeper(0).await;
    let room = cluster.start_extra_room("room-late", &[]).await.unwrap();
    let listed = eventually(Duration::from_secs(15), || async {
        let url = format!("{}/v1/dispatch?user=probe", cluster.dispatcher_url());
        match cluster.http.get(&url).send().await {
            Ok(response) => response
                .json::<serde_json::Value>()
                .await
                .map(|body| body["result"]["rooms"].as_array().map_or(0, Vec::len) == 2)
                .unwrap_or(false),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        listed,
        "the room that joined through the second keeper is listed"
    );

    // Every keeper away, for more than two lease TTLs (3 s each): 8 s by
    // default, PUSHGRID_KEEPERS_AWAY_SECS for a longer outage (60 s was run
    // for docs/reliability.md). The sleeps are the outage itself.
    let away_secs: u64 = std::env::var("PUSHGRID_KEEPERS_AWAY_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(8)
        .max(8);
    let away_since = std::time::Instant::now();
    cluster.kill_keeper(1).await;
    // Half the outage passes first, so the device below connects in the
    // middle of it: a point in the fault, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(away_secs / 2)).await;
    // A device connects (to the room that joined late) and is reached.
    let late = start_device("lou", room.addr("tcp").to_string());
    let mut reached = false;
    for _ in 0..50 {
        let id = cluster
            .push(&["lou"], "while no keeper runs")
            .await
            .unwrap()[0];
        if eventually(Duration::from_millis(500), || async {
            seen.lock().unwrap().contains_key(&id)
        })
        .await
        {
            reached = true;
            break;
        }
    }
    assert!(
        reached,
        "a device that connected while no keeper ran is reached"
    );
    // The outage goes on (the load with it) before the keepers come back:
    // its length is the fault, not a wait for a condition.
    let away = Duration::from_secs(away_secs);
    tokio::time::sleep(away.saturating_sub(away_since.elapsed())).await;
    let away = away_since.elapsed();

    cluster.start_keeper_again(0).await.unwrap();
    cluster.start_keeper_again(1).await.unwrap();
    // The nodes register again (their leases ended meanwhile) and are listed.
    let back = eventually(Duration::from_secs(20), || async {
        let text = pushgrid_e2e::metrics_text(cluster.keeper.addr("admin")).await;
        pushgrid_e2e::metric_in(&text, "pushgrid_keeper_nodes", "") >= 9.0
    })
    .await;
    assert!(back, "every node and both keepers are listed again");
    // The load's steady period on the recovered cluster, before it stops:
    // time passing under load, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop.store(true, Ordering::Relaxed);
    pushing.await.unwrap();

    let accepted: Vec<u64> = load.ledger.lock().unwrap().keys().copied().collect();
    let delivered = eventually(Duration::from_secs(30), || async {
        let seen = seen.lock().unwrap();
        accepted.iter().all(|id| seen.contains_key(id))
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let lost: Vec<u64> = accepted
        .iter()
        .filter(|id| !seen.contains_key(id))
        .copied()
        .collect();
    let twice: Vec<u64> = seen
        .iter()
        .filter(|(_, times)| **times > 1)
        .map(|(id, _)| *id)
        .collect();
    let refused = load.refused.load(Ordering::Relaxed);
    println!(
        "KEEPERS accepted {} pushes to a connected device across one keeper's death and every keeper away \
         for {:.1} s: lost {}, handed twice {}, refused {refused}",
        accepted.len(),
        away.as_secs_f64(),
        lost.len(),
        twice.len()
    );
    assert!(delivered, "lost: {lost:?}");
    assert!(twice.is_empty(), "handed twice: {twice:?}");
    assert_eq!(refused, 0, "pushes were refused while keepers were away");
    assert!(accepted.len() > 50, "the load ran");
    first.close().await;
    late.close().await;
    cluster.cleanup().await;
}
