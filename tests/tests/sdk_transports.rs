//! The Rust SDK over every transport a room serves, against real rooms: a
//! `Client` over TLS, WebSocket and WebSocket over TLS authenticates, gets a
//! push sent through the push API exactly once and acks it; a client that
//! prefers wss takes the dispatcher's wss address; a KICK from a draining room
//! moves WebSocket clients to a TCP-only room; an untrusted certificate is a
//! clear error; the CLI connects over wss with `--ca`.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use pushgrid_client::{
    Client, ClientConfig, ClientError, ConnectOptions, Connection, Event, Transport, msg,
};
use pushgrid_e2e::{
    ClusterOptions, Proc, TestCert, TestCluster, all_transports_room_settings, test_cert,
};
use serde_json::json;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// A one-room cluster plus a room `room-all` serving TCP, WebSocket, TLS and
/// WebSocket over TLS with a self-signed certificate.
async fn cluster_with_all_transports() -> (TestCluster, Proc, TestCert) {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let cert = test_cert(&cluster.dir);
    let room = cluster
        .start_extra_room("room-all", &all_transports_room_settings("room-all", &cert))
        .await
        .unwrap();
    (cluster, room, cert)
}

/// A client of `user` trying `addrs`, trusting `cert`, retrying quickly.
fn client_config(cluster: &TestCluster, cert: &TestCert, user: &str) -> ClientConfig {
    let mut config = ClientConfig::new(cluster.app.token(user), format!("{user}-phone"));
    config.tls.root_ders = vec![cert.der.clone()];
    config.reconnect_backoff_min = Duration::from_millis(50);
    config.reconnect_backoff_max = Duration::from_millis(500);
    config
}

/// Collects events until `want` matches, or panics after `WAIT`.
async fn next_matching(
    events: &mut mpsc::Receiver<Event>,
    seen: &mut Vec<Event>,
    want: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching event in time; saw {seen:#?}"))
            .expect("client alive");
        seen.push(event.clone());
        if want(&event) {
            return event;
        }
    }
}

fn is_connected(event: &Event) -> bool {
    matches!(event, Event::Connected { .. })
}

fn is_push(event: &Event) -> bool {
    matches!(event, Event::Push(_))
}

fn pushes(seen: &[Event]) -> Vec<(u64, String)> {
    seen.iter()
        .filter_map(|event| match event {
            Event::Push(push) => Some((
                push.msg_id,
                String::from_utf8_lossy(&push.payload).to_string(),
            )),
            _ => None,
        })
        .collect()
}

/// The message's state in `message_status` (`stored`, `delivered`, `acked`...).
async fn message_state(cluster: &TestCluster, id: u64) -> String {
    let (status, answer) = cluster
        .call(
            &cluster.app.api_key,
            "message_status",
            json!({ "id": id.to_string() }),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["result"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Connects a `Client` to `addr`, checks the push / ack / no-redelivery cycle.
async fn client_gets_a_push_once_and_acks_it(
    cluster: &TestCluster,
    cert: &TestCert,
    user: &str,
    addr: String,
) {
    let mut config = client_config(cluster, cert, user);
    config.addrs = vec![addr.clone()];
    let (client, mut events) = Client::start(config);
    let mut seen = Vec::new();
    let connected = next_matching(&mut events, &mut seen, is_connected).await;
    assert!(
        matches!(&connected, Event::Connected { room_addr, .. } if *room_addr == addr),
        "{connected:?}"
    );

    let payload = format!("hello {user}");
    let first = cluster.push(&[user], &payload).await.unwrap()[0];
    let Event::Push(push) = next_matching(&mut events, &mut seen, is_push).await else {
        unreachable!()
    };
    assert_eq!(
        (push.msg_id, &push.payload[..]),
        (first, payload.as_bytes())
    );
    client.ack(vec![first]).await.unwrap();
    let acked = pushgrid_e2e::eventually(WAIT, || async {
        message_state(cluster, first).await == "acked"
    })
    .await;
    assert!(acked, "the ACK over {addr} reached the store");

    // Acked: a new connection over the same transport does not bring it back,
    // and the next push is the next thing the app sees.
    client.reconnect().await.unwrap();
    next_matching(&mut events, &mut seen, is_connected).await;
    let second = cluster.push(&[user], "second").await.unwrap()[0];
    next_matching(&mut events, &mut seen, is_push).await;
    assert_eq!(
        pushes(&seen),
        [(first, payload), (second, "second".to_string())],
        "each push handed to the app once, over {addr}"
    );
    let stats = client.stats();
    assert_eq!(stats.pushes_received, 2, "{stats:?}");
    assert!(stats.acks_sent >= 1, "{stats:?}");
    assert_eq!(stats.reconnects, 1, "{stats:?}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_tls_websocket_and_wss_gets_each_push_once_and_acks_it() {
    let (cluster, room, cert) = cluster_with_all_transports().await;
    // TLS checked by name, WebSocket with the default path, WSS checked by the
    // IP address the room announces, with a path.
    let tls = format!("tls://localhost:{}", room.addr("tls").port());
    client_gets_a_push_once_and_acks_it(&cluster, &cert, "tls-user", tls).await;
    let ws = format!("ws://{}/", room.addr("ws"));
    client_gets_a_push_once_and_acks_it(&cluster, &cert, "ws-user", ws).await;
    let wss = format!("wss://{}/device", room.addr("wss"));
    client_gets_a_push_once_and_acks_it(&cluster, &cert, "wss-user", wss).await;

    // The CLI: the message waits in the inbox, the CLI connects over wss
    // trusting the certificate through --ca, prints it, acks and exits.
    let id = cluster.push(&["cli-user"], "to the cli").await.unwrap()[0];
    let child = tokio::process::Command::new(pushgrid_e2e::binary("pushgrid-client"))
        .args([
            "--addr",
            &format!("wss://localhost:{}/", room.addr("wss").port()),
            "--ca",
            &cert.cert_file,
            "--token",
            &cluster.app.token("cli-user"),
            "--count",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the CLI exits after one push")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "to the cli\n");
    let acked = pushgrid_e2e::eventually(WAIT, || async {
        message_state(&cluster, id).await == "acked"
    })
    .await;
    assert!(acked, "the CLI acked the push");
    cluster.cleanup().await;
}

/// Waits until the dispatcher lists room `node`.
async fn wait_until_dispatched(cluster: &TestCluster, node: &str) {
    let listed = pushgrid_e2e::eventually(WAIT, || async {
        let Ok(dispatch) =
            pushgrid_client::dispatch(&cluster.http, &cluster.dispatcher_url(), "probe").await
        else {
            return false;
        };
        dispatch.rooms.iter().any(|room| room.node == node)
    })
    .await;
    assert!(listed, "the dispatcher lists {node}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preferred_transport_is_used_and_a_kick_moves_websocket_clients_to_a_tcp_room() {
    let (cluster, room, cert) = cluster_with_all_transports().await;
    let (status, body) = cluster
        .admin(
            reqwest::Method::PUT,
            "/admin/settings/room.drain_window_secs",
            Some(json!({ "value": "2" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_until_dispatched(&cluster, "room-all").await;
    let tcp_room = cluster.room_addr(0);

    // Through the dispatcher, preferring wss: room0 serves only TCP, so the
    // one room to try is room-all's wss listener.
    let mut config = client_config(&cluster, &cert, "dispatched");
    config.dispatcher = Some(cluster.dispatcher_url());
    config.transport = Transport::Wss;
    let (dispatched, mut dispatched_events) = Client::start(config);
    let mut dispatched_seen = Vec::new();
    let connected = next_matching(&mut dispatched_events, &mut dispatched_seen, is_connected).await;
    let wss = format!("wss://{}/", room.addr("wss"));
    assert!(
        matches!(&connected, Event::Connected { room_addr, .. } if *room_addr == wss),
        "{connected:?}"
    );
    let id = cluster.push(&["dispatched"], "over wss").await.unwrap()[0];
    next_matching(&mut dispatched_events, &mut dispatched_seen, is_push).await;
    assert_eq!(pushes(&dispatched_seen), [(id, "over wss".to_string())]);

    // Straight to room-all's WebSocket listener, no dispatcher.
    let mut config = client_config(&cluster, &cert, "direct");
    config.addrs = vec![format!("ws://{}/push", room.addr("ws"))];
    let (direct, mut direct_events) = Client::start(config);
    let mut direct_seen = Vec::new();
    next_matching(&mut direct_events, &mut direct_seen, is_connected).await;

    // The drain sends both a KICK naming room0's TCP listener, bare (room0
    // has no WebSocket or TLS listener). The dispatched client knows it from
    // the dispatcher's answer; the direct one tries a WebSocket there first,
    // which the TCP listener refuses, then TCP.
    let answer = cluster
        .http
        .post(format!("http://{}/admin/drain", room.addr("admin")))
        .bearer_auth(pushgrid_e2e::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    for (client_events, seen, user) in [
        (&mut dispatched_events, &mut dispatched_seen, "dispatched"),
        (&mut direct_events, &mut direct_seen, "direct"),
    ] {
        let kicked = next_matching(client_events, seen, |event| {
            matches!(event, Event::Kicked(_))
        })
        .await;
        assert!(
            matches!(&kicked, Event::Kicked(kick) if kick.reconnect_to == tcp_room
                && kick.code() == msg::KickCode::Shutdown),
            "{user}: {kicked:?}"
        );
        let moved = next_matching(client_events, seen, is_connected).await;
        assert!(
            matches!(&moved, Event::Connected { room_addr, .. } if *room_addr == tcp_room),
            "{user} moved to room0 over TCP: {moved:?}"
        );
    }
    // Both are reachable there.
    for (client_events, seen, user) in [
        (&mut dispatched_events, &mut dispatched_seen, "dispatched"),
        (&mut direct_events, &mut direct_seen, "direct"),
    ] {
        let delivered = tokio::time::timeout(WAIT, async {
            loop {
                cluster.push(&[user], "after the move").await.unwrap();
                let got = tokio::time::timeout(Duration::from_secs(2), async {
                    loop {
                        match client_events.recv().await {
                            Some(Event::Push(push)) if &push.payload[..] == b"after the move" => {
                                return;
                            }
                            Some(event) => seen.push(event),
                            None => panic!("{user}: the client stopped"),
                        }
                    }
                })
                .await;
                if got.is_ok() {
                    return;
                }
            }
        })
        .await;
        assert!(delivered.is_ok(), "{user} got a push on room0: {seen:#?}");
    }
    assert!(dispatched.stats().reconnects >= 1);
    assert!(direct.stats().reconnects >= 1);
    dispatched.close().await;
    direct.close().await;
    cluster.cleanup().await;
}

fn auth(cluster: &TestCluster, user: &str) -> msg::Auth {
    msg::Auth {
        token: cluster.app.token(user),
        device_id: format!("{user}-raw"),
        platform: "test".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_a_clear_error() {
    let (cluster, room, cert) = cluster_with_all_transports().await;
    let tls = format!("tls://localhost:{}", room.addr("tls").port());
    let wss = format!("wss://{}/", room.addr("wss"));

    // Default trust (the public web roots) does not cover a self-signed room.
    for addr in [&tls, &wss] {
        let error = Connection::connect(addr, auth(&cluster, "stranger"))
            .await
            .unwrap_err();
        let ClientError::Tls {
            addr: failed,
            reason,
        } = &error
        else {
            panic!("{addr}: expected a TLS error, got {error:?}");
        };
        assert_eq!(failed, addr);
        assert!(
            reason.contains("invalid peer certificate") && reason.contains("not trusted"),
            "{error}"
        );
        assert!(error.to_string().contains(addr.as_str()), "{error}");
    }

    // The right root but the wrong name.
    let options = ConnectOptions {
        tls: pushgrid_client::TlsOptions {
            root_ders: vec![cert.der.clone()],
            server_name: Some("push.example.com".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let error = Connection::connect_with(&tls, auth(&cluster, "stranger"), &options)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Tls { reason, .. } if reason.contains("not valid for name")),
        "{error:?}"
    );

    // The same root and the default name (the host) pass.
    let options = ConnectOptions {
        tls: pushgrid_client::TlsOptions {
            root_ders: vec![cert.der.clone()],
            ..Default::default()
        },
        ..Default::default()
    };
    let (_connection, auth_ok) = Connection::connect_with(&tls, auth(&cluster, "known"), &options)
        .await
        .unwrap();
    assert!(auth_ok.conn_id > 0);

    // A Client trusting another certificate reports why it cannot connect,
    // and keeps trying (the room may get a certificate it trusts).
    let stranger_dir = cluster.dir.join("stranger");
    std::fs::create_dir_all(&stranger_dir).unwrap();
    let stranger = test_cert(&stranger_dir);
    let mut config = client_config(&cluster, &stranger, "stranger");
    config.addrs = vec![tls.clone()];
    let (client, mut events) = Client::start(config);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let failed = next_matching(&mut events, &mut seen, |event| {
            matches!(event, Event::ConnectFailed { .. })
        })
        .await;
        assert!(
            matches!(&failed, Event::ConnectFailed { reason, .. }
                if reason.contains(&tls) && reason.contains("invalid peer certificate")),
            "{failed:?}"
        );
    }
    assert!(!seen.iter().any(is_connected), "never connected: {seen:#?}");
    assert_eq!(client.stats().connects, 0);
    assert!(!client.is_closed());
    client.close().await;
    cluster.cleanup().await;
}
