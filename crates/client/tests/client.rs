//! The SDK against a fake room (see `fake_room`).

#![allow(clippy::unwrap_used)]

mod fake_room;

use std::time::Duration;

use fake_room::FakeRoom;
use pushgrid_client::{Client, ClientConfig, ClientError, Connection, Event, msg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

fn config(token: &str, addrs: Vec<String>) -> ClientConfig {
    let mut config = ClientConfig::new(token, "device-1");
    config.addrs = addrs;
    config.platform = "test".into();
    config.reconnect_backoff_min = Duration::from_millis(20);
    config.reconnect_backoff_max = Duration::from_millis(200);
    config.upstream_timeout = Duration::from_secs(3);
    config
}

async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("the event channel is open")
}

/// Skips events until one matches.
async fn wait_for(
    events: &mut mpsc::Receiver<Event>,
    what: &str,
    matches: impl Fn(&Event) -> bool,
) -> Event {
    for _ in 0..100 {
        let event = next_event(events).await;
        if matches(&event) {
            return event;
        }
    }
    panic!("no {what} event");
}

async fn next_push(events: &mut mpsc::Receiver<Event>) -> msg::Push {
    match wait_for(events, "push", |event| matches!(event, Event::Push(_))).await {
        Event::Push(push) => push,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn duplicates_are_dropped_across_reconnects_and_acked_ones_are_reacked() {
    let room = FakeRoom::start_with(&[(1, "one"), (2, "two"), (3, "three")], 30).await;
    let (client, mut events) = Client::start(config("good", vec![room.addr.clone()]));

    let connected = next_event(&mut events).await;
    assert!(
        matches!(&connected, Event::Connected { conn_id: 1, room_addr, .. } if *room_addr == room.addr),
        "{connected:?}"
    );
    let ids: Vec<u64> = [
        next_push(&mut events).await,
        next_push(&mut events).await,
        next_push(&mut events).await,
    ]
    .iter()
    .map(|push| push.msg_id)
    .collect();
    assert_eq!(ids, [1, 2, 3]);

    client.ack(vec![1]).await.unwrap();
    room.wait_until("message 1 is acked", |state| state.acked == [1])
        .await;

    // A network drop: the room redelivers its unacked inbox (2 and 3) on the new connection.
    client.reconnect().await.unwrap();
    wait_for(&mut events, "disconnect", |event| {
        matches!(event, Event::Disconnected { .. })
    })
    .await;
    wait_for(&mut events, "reconnect", |event| {
        matches!(event, Event::Connected { conn_id: 2, .. })
    })
    .await;
    // The ACK of 1 was lost on the way: the room sends it again.
    room.resend(1, "one").await;
    room.push(4, "four").await;

    let push = next_push(&mut events).await;
    assert_eq!(
        (push.msg_id, &push.payload[..]),
        (4, &b"four"[..]),
        "2, 3 and 1 were dropped as duplicates"
    );
    room.wait_until("the redelivered 1 is re-acked", |state| {
        state.acked == [1, 1]
    })
    .await;

    let stats = client.stats();
    assert_eq!(stats.pushes_received, 4);
    assert_eq!(stats.duplicates_dropped, 3);
    assert_eq!(stats.reconnects, 1);

    // The application's later acks go to the current connection.
    client.ack(vec![2, 3, 4]).await.unwrap();
    room.wait_until("the inbox is empty", |state| state.inbox.is_empty())
        .await;
    client.close().await;
    assert!(
        events.recv().await.is_none(),
        "the event channel closes after close()"
    );
}

#[tokio::test]
async fn auto_ack_acks_every_push_once() {
    let room = FakeRoom::start_with(&[(7, "seven")], 30).await;
    let mut config = config("good", vec![room.addr.clone()]);
    config.auto_ack = true;
    let (client, mut events) = Client::start(config);
    assert_eq!(next_push(&mut events).await.msg_id, 7);
    room.push(8, "eight").await;
    assert_eq!(next_push(&mut events).await.msg_id, 8);
    room.wait_until("both are acked", |state| {
        state.inbox.is_empty() && state.acked == [7, 8]
    })
    .await;
    client.close().await;
}

#[tokio::test]
async fn auth_failure_surfaces_the_servers_code_and_message_and_stops() {
    let room = FakeRoom::start().await;
    let (client, mut events) = Client::start(config("bad", vec![room.addr.clone()]));
    let event = next_event(&mut events).await;
    assert_eq!(
        event,
        Event::AuthFailed {
            code: msg::ErrorCode::AuthFailed,
            message: "token expired".into()
        }
    );
    assert!(
        events.recv().await.is_none(),
        "no reconnect after an auth failure"
    );
    assert!(client.is_closed());
    assert_eq!(room.state.lock().await.auths.len(), 1);

    let auth = msg::Auth {
        token: "bad".into(),
        device_id: "d".into(),
        platform: "test".into(),
    };
    let error = Connection::connect(&room.addr, auth).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::AuthRefused { code: msg::ErrorCode::AuthFailed, message } if message == "token expired"),
        "{error:?}"
    );
    assert!(error.to_string().contains("token expired"), "{error}");
}

#[tokio::test]
async fn a_transient_auth_refusal_is_retried() {
    let room = FakeRoom::start().await;
    let (client, mut events) = Client::start(config("busy", vec![room.addr.clone()]));
    room.wait_until("three attempts", |state| state.auths.len() >= 3)
        .await;
    assert!(!client.is_closed());
    client.close().await;
    // Each failed round was reported, with the server's refusal; nothing else.
    let mut reported = 0;
    while let Some(event) = events.recv().await {
        let Event::ConnectFailed { reason, .. } = &event else {
            panic!("unexpected event {event:?}");
        };
        assert!(reason.contains("UNAVAILABLE"), "{reason}");
        reported += 1;
    }
    assert!(reported >= 2, "{reported} failed rounds reported");
}

#[tokio::test]
async fn upstream_answers_are_matched_by_seq() {
    let room = FakeRoom::start().await;
    let (client, mut events) = Client::start(config("good", vec![room.addr.clone()]));
    wait_for(&mut events, "connect", |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;

    // "slow" is answered last; each caller still gets its own answer.
    let slow = client.upstream("slow", "chat", "m-slow", &b"a"[..]);
    let fast = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.upstream("chat", "text", "m-fast", &b"b"[..]).await
    };
    let fail = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.upstream("fail", "text", "m-fail", &b"c"[..]).await
    };
    let (slow, fast, fail) = tokio::join!(slow, fast, fail);
    slow.unwrap();
    fast.unwrap();
    match fail {
        Err(ClientError::UpstreamRefused {
            code: msg::ErrorCode::UpstreamFailed,
            message,
        }) => {
            assert_eq!(message, "no route for fail");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let sent = room.state.lock().await.upstreams.clone();
    let seq_of = |id: &str| {
        sent.iter()
            .find(|(_, upstream)| upstream.client_msg_id == id)
            .unwrap()
            .0
    };
    let seqs = [seq_of("m-slow"), seq_of("m-fast"), seq_of("m-fail")];
    assert!(
        seqs[0] != seqs[1] && seqs[1] != seqs[2] && seqs[0] != seqs[2],
        "{seqs:?}"
    );
    assert_eq!(sent[0].1.r#type, "chat");
    assert_eq!(&sent[0].1.payload[..], b"a");

    let mut acks = Vec::new();
    while acks.len() < 3 {
        if let Event::UpstreamAck {
            seq,
            client_msg_id,
            ok,
            error,
        } = next_event(&mut events).await
        {
            acks.push((client_msg_id, seq, ok, error.is_some()));
        }
    }
    acks.sort();
    assert_eq!(
        acks,
        [
            ("m-fail".to_owned(), seqs[2], false, true),
            ("m-fast".to_owned(), seqs[1], true, false),
            ("m-slow".to_owned(), seqs[0], true, false),
        ]
    );
    client.close().await;
}

#[tokio::test]
async fn upstream_waits_for_a_connection_and_times_out_without_one() {
    // Nothing listens at port 1: every attempt fails, the upstream times out.
    let mut config = config("good", vec!["127.0.0.1:1".into()]);
    config.upstream_timeout = Duration::from_millis(200);
    let (client, _events) = Client::start(config);
    let error = client
        .upstream("chat", "text", "m", &b""[..])
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::UpstreamTimeout(_)),
        "{error:?}"
    );
    client.close().await;
}

#[tokio::test]
async fn reconnects_after_the_room_drops_the_connection_and_pings() {
    let room = FakeRoom::start().await;
    let mut config = config("good", vec![room.addr.clone()]);
    config.heartbeat = Some(Duration::from_millis(50));
    let (client, mut events) = Client::start(config);
    wait_for(&mut events, "connect", |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    room.wait_until("two pings", |state| state.pings >= 2).await;
    room.drop_connection().await;
    let event = wait_for(&mut events, "disconnect", |event| {
        matches!(event, Event::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(&event, Event::Disconnected { reason } if reason.contains("closed")),
        "{event:?}"
    );
    wait_for(&mut events, "reconnect", |event| {
        matches!(event, Event::Connected { conn_id: 2, .. })
    })
    .await;
    assert_eq!(client.stats().reconnects, 1);
    client.close().await;
}

#[tokio::test]
async fn kick_redirects_to_the_given_room() {
    let first = FakeRoom::start().await;
    let second = FakeRoom::start().await;
    let (client, mut events) = Client::start(config("good", vec![first.addr.clone()]));
    wait_for(&mut events, "connect", |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    let kick = msg::Kick {
        code: msg::KickCode::Shutdown as i32,
        reason: "draining".into(),
        reconnect_after_ms: 50,
        reconnect_to: second.addr.clone(),
    };
    first.kick(kick.clone()).await;
    assert_eq!(
        wait_for(&mut events, "kick", |event| matches!(
            event,
            Event::Kicked(_)
        ))
        .await,
        Event::Kicked(kick)
    );
    let event = wait_for(&mut events, "reconnect", |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    assert!(
        matches!(&event, Event::Connected { room_addr, .. } if *room_addr == second.addr),
        "{event:?}"
    );
    client.close().await;
}

#[tokio::test]
async fn single_login_kick_stops_the_client() {
    let room = FakeRoom::start().await;
    let (client, mut events) = Client::start(config("good", vec![room.addr.clone()]));
    wait_for(&mut events, "connect", |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    let kick = msg::Kick {
        code: msg::KickCode::SingleLogin as i32,
        reason: "newer login".into(),
        ..Default::default()
    };
    room.kick(kick).await;
    wait_for(&mut events, "kick", |event| {
        matches!(event, Event::Kicked(_))
    })
    .await;
    wait_for(&mut events, "disconnect", |event| {
        matches!(event, Event::Disconnected { .. })
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .is_none()
    );
    assert!(client.is_closed());
}

/// A one-shot HTTP server answering every request with `body`; returns its URL.
async fn fake_dispatcher(body: String) -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (requests, request_lines) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => request.extend_from_slice(&chunk[..read]),
                }
            }
            let first_line = String::from_utf8_lossy(&request)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            let _ = requests.try_send(first_line);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    (url, request_lines)
}

#[tokio::test]
async fn dispatcher_rooms_are_tried_in_order() {
    let room = FakeRoom::start().await;
    let body = format!(
        r#"{{"result": {{"rooms": [{{"node": "dead", "tcp": "127.0.0.1:1"}}, {{"node": "room-1", "tcp": "{}"}}], "ttl_secs": 60}}}}"#,
        room.addr
    );
    let (url, mut requests) = fake_dispatcher(body).await;
    let mut config = config("good", Vec::new());
    config.dispatcher = Some(url);
    config.user = Some("alice".into());
    let (client, mut events) = Client::start(config);
    let event = wait_for(&mut events, "connect", |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    assert!(
        matches!(&event, Event::Connected { room_addr, .. } if *room_addr == room.addr),
        "{event:?}"
    );
    let request = requests.recv().await.unwrap();
    assert!(
        request.starts_with("GET /v1/dispatch?user=alice "),
        "{request}"
    );
    client.close().await;
}

#[tokio::test]
async fn raw_connection_speaks_the_protocol() {
    let room = FakeRoom::start_with(&[(5, "five")], 7).await;
    let auth = msg::Auth {
        token: "good".into(),
        device_id: "raw".into(),
        platform: "test".into(),
    };
    let (mut connection, auth_ok) = Connection::connect(&room.addr, auth).await.unwrap();
    assert_eq!(auth_ok.heartbeat_secs, 7);
    let frame = connection.next_frame().await.unwrap().unwrap();
    assert_eq!(frame.op, pushgrid_client::Op::Push);
    let push: msg::Push = frame.decode().unwrap();
    assert_eq!(push.msg_id, 5);
    connection
        .send_empty(pushgrid_client::Op::Ping, 9)
        .await
        .unwrap();
    let pong = connection.next_frame().await.unwrap().unwrap();
    assert_eq!((pong.op, pong.seq), (pushgrid_client::Op::Pong, 9));
    connection
        .send_frame(pushgrid_client::Op::Ack, 0, &msg::Ack { msg_ids: vec![5] })
        .await
        .unwrap();
    room.wait_until("5 is acked", |state| state.inbox.is_empty())
        .await;
    room.drop_connection().await;
    assert!(
        connection.next_frame().await.unwrap().is_none(),
        "a clean close is Ok(None)"
    );
}
