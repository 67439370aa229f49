//! A room's outbound queues: a device that stops reading fills its socket,
//! then its bounded queue, and is kicked as a slow consumer while every other
//! device of the room keeps receiving every broadcast. Real processes; the
//! room under test has small queue limits.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use pushgrid_client::{Connection, Op, msg};
use pushgrid_e2e::{ClusterOptions, TestCluster, metric};
use pushgrid_wire::{Decoded, decode_frame, encode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(20);
const READERS: usize = 20;
/// Broadcasts are sent until the stalled device is kicked, at most this many
/// (the kernel buffers a few MB for a socket nobody reads).
const MAX_BROADCASTS: usize = 1000;
const PAYLOAD_BYTES: usize = 40_000;
const LAST: &str = "the last broadcast";

/// A device socket with a small receive buffer that authenticates and then
/// reads nothing until told to.
async fn stalled_device(room: SocketAddr, token: String) -> (TcpStream, BytesMut) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(room).await.unwrap();
    let auth = msg::Auth {
        token,
        device_id: "slow-phone".into(),
        platform: "test".into(),
    };
    stream.write_all(&encode(Op::Auth, 1, &auth)).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Decoded::Frame(frame) = decode_frame(&mut buf, 1 << 20).unwrap() {
            assert_eq!(frame.op, Op::AuthOk);
            return (stream, buf);
        }
        assert!(
            stream.read_buf(&mut buf).await.unwrap() > 0,
            "closed at AUTH"
        );
    }
}

/// Reads the stalled device's socket to its end; the ops it got, in order.
async fn drain(stream: &mut TcpStream, mut buf: BytesMut) -> Vec<(Op, Option<msg::KickCode>)> {
    let mut ops = Vec::new();
    loop {
        while let Decoded::Frame(frame) = decode_frame(&mut buf, 1 << 20).unwrap() {
            let kick = (frame.op == Op::Kick).then(|| frame.decode::<msg::Kick>().unwrap().code());
            ops.push((frame.op, kick));
        }
        let read = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
            .await
            .expect("the room closes the slow device")
            .unwrap();
        if read == 0 {
            return ops;
        }
    }
}

/// The offsets of the broadcasts one reader gets, up to the last one.
async fn read_broadcasts(mut device: Connection) -> Vec<u64> {
    let mut offsets = Vec::new();
    loop {
        let frame = tokio::time::timeout(WAIT, device.next_frame())
            .await
            .expect("every broadcast reaches a reading device")
            .unwrap()
            .expect("open connection");
        if frame.op != Op::Push {
            continue;
        }
        let push = frame.decode::<msg::Push>().unwrap();
        offsets.push(push.offset);
        if &push.payload[..] == LAST.as_bytes() {
            return offsets;
        }
    }
}

async fn broadcast(cluster: &TestCluster, payload: &str) {
    let answer = cluster
        .http
        .post(format!("{}/api/broadcast", cluster.center_url()))
        .header("Authorization", format!("apikey {}", cluster.app.api_key))
        .json(&json!({ "topic": "", "payload": payload }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_that_stops_reading_is_kicked_and_the_others_get_everything() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let room = cluster
        .start_extra_room(
            "room-small-queues",
            &[
                "node_id=room-small-queues".into(),
                "tcp_listen=127.0.0.1:0".into(),
                "outbound_queue=8".into(),
                "outbound_queue_bytes=131072".into(),
            ],
        )
        .await
        .unwrap();
    let room_tcp = room.addr("tcp");
    let room_admin = room.addr("admin");

    let mut readers = Vec::new();
    for index in 0..READERS {
        let auth = msg::Auth {
            token: cluster.app.token(&format!("reader{index}")),
            device_id: "phone".into(),
            platform: "test".into(),
        };
        let (device, _) = Connection::connect(&room_tcp.to_string(), auth)
            .await
            .unwrap();
        readers.push(tokio::spawn(read_broadcasts(device)));
    }
    let (mut slow, slow_buf) = stalled_device(room_tcp, cluster.app.token("slowpoke")).await;

    let payload = "p".repeat(PAYLOAD_BYTES);
    let mut sent = 0;
    let kicks = |admin| metric(admin, "pushgrid_room_slow_consumer_kicks_total", "");
    while sent < MAX_BROADCASTS {
        broadcast(&cluster, &payload).await;
        sent += 1;
        if sent % 10 == 0 && kicks(room_admin).await >= 1.0 {
            break;
        }
    }
    broadcast(&cluster, LAST).await;
    sent += 1;
    println!("{sent} broadcasts of {PAYLOAD_BYTES} B until the stalled device was kicked");

    // Every reading device has every broadcast, once, in offset order.
    for reader in readers {
        let offsets = reader.await.unwrap();
        assert_eq!(offsets.len(), sent);
        assert!(
            offsets.windows(2).all(|pair| pair[0] < pair[1]),
            "{offsets:?}"
        );
    }
    // The stalled device was kicked as a slow consumer: what it finally reads
    // is some of the broadcasts, then the KICK, then the end of the stream.
    let ops = drain(&mut slow, slow_buf).await;
    let (last, pushes) = ops.split_last().expect("frames before the close");
    assert_eq!(
        *last,
        (Op::Kick, Some(msg::KickCode::SlowConsumer)),
        "{ops:?}"
    );
    assert!(pushes.iter().all(|(op, _)| *op == Op::Push), "{ops:?}");
    assert!(
        pushes.len() < sent,
        "a device whose queue overflowed cannot have had every broadcast"
    );
    assert_eq!(kicks(room_admin).await, 1.0, "after {sent} broadcasts");
    assert_eq!(
        metric(
            room_admin,
            "pushgrid_room_closes_total",
            "reason=\"kick_slow_consumer\""
        )
        .await,
        1.0
    );
    assert!(metric(room_admin, "pushgrid_room_queue_drops_total", "").await >= 1.0);
    cluster.cleanup().await;
}
