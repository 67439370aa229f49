//! Room protection: per-address connection cap, connect rate and CIDR deny
//! lists, set in keeper and put in force on a running room; and an accept
//! loop that backs off when the process runs out of file descriptors.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use pushgrid_client::{Connection, msg};
use pushgrid_e2e::{ClusterOptions, TestCluster, eventually, metric, next_frame, wait_for};
use pushgrid_wire::{Op, encode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

async fn put_setting(cluster: &TestCluster, name: &str, value: &str) {
    let (status, body) = cluster
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/settings/{name}"),
            Some(serde_json::json!({ "value": value })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn delete_setting(cluster: &TestCluster, name: &str) {
    let (status, body) = cluster
        .admin(
            reqwest::Method::DELETE,
            &format!("/admin/settings/{name}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// A TCP connection to `room` from the loopback address `source`.
async fn connect_from(source: Ipv4Addr, room: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    socket.connect(room).await.unwrap()
}

fn auth(cluster: &TestCluster, user: &str) -> msg::Auth {
    msg::Auth {
        token: cluster.app.token(user),
        device_id: format!("{user}-d"),
        platform: "test".into(),
    }
}

/// Sends AUTH on `stream` and reads frames until the server closes or
/// answers AUTH_OK: `Ok(())` for AUTH_OK, `Err(error)` for an ERROR frame.
async fn try_auth(mut stream: TcpStream, auth: msg::Auth) -> Result<TcpStream, msg::Error> {
    // A refused device may be closed before its AUTH is written.
    let _ = stream.write_all(&encode(Op::Auth, 1, &auth)).await;
    let mut buf = bytes::BytesMut::new();
    loop {
        match pushgrid_wire::decode_frame(&mut buf, 1 << 20).unwrap() {
            pushgrid_wire::Decoded::Frame(frame) if frame.op == Op::AuthOk => return Ok(stream),
            pushgrid_wire::Decoded::Frame(frame) if frame.op == Op::Error => {
                return Err(frame.decode::<msg::Error>().unwrap());
            }
            pushgrid_wire::Decoded::Frame(frame) => panic!("unexpected {:?}", frame.op),
            pushgrid_wire::Decoded::Incomplete { .. } => {}
        }
        let read = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
            .await
            .expect("the room answers AUTH");
        match read {
            Ok(0) | Err(_) => panic!("closed without an answer to AUTH"),
            Ok(_) => {}
        }
    }
}

/// Retries `attempt` (10 s at most) until it gives something: settings reach
/// rooms through keeper's watch stream, a moment after the admin call.
async fn until_some<T, F, Fut>(what: &str, attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_for(WAIT, attempt)
        .await
        .unwrap_or_else(|| panic!("never: {what}"))
}

async fn until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(eventually(WAIT, check).await, "never: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_cap_rate_and_deny_list_refuse_with_a_reason_and_change_live() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let room = cluster.rooms[0].addr("tcp");
    let admin = cluster.rooms[0].addr("admin");
    let c = &cluster;

    // ---- Cap: two connections per address.
    put_setting(c, "room.max_conns_per_ip", "2").await;
    let source = Ipv4Addr::new(127, 0, 0, 21);
    let first = try_auth(connect_from(source, room).await, auth(c, "cap-a"))
        .await
        .unwrap();
    let second = try_auth(connect_from(source, room).await, auth(c, "cap-b"))
        .await
        .unwrap();
    let refused = until_some(
        "the third connection of one address is refused",
        move || async move {
            try_auth(connect_from(source, room).await, auth(c, "cap-c"))
                .await
                .err()
        },
    )
    .await;
    assert_eq!(refused.code(), msg::ErrorCode::TooManyConnections);
    assert!(refused.message.contains("at most 2"), "{}", refused.message);
    // Another address is not affected.
    try_auth(
        connect_from(Ipv4Addr::new(127, 0, 0, 22), room).await,
        auth(c, "cap-d"),
    )
    .await
    .unwrap();
    // A closed connection gives its place back.
    drop(first);
    until(
        "a place is given back when a connection closes",
        move || async move {
            try_auth(connect_from(source, room).await, auth(c, "cap-e"))
                .await
                .is_ok()
        },
    )
    .await;
    drop(second);
    assert!(metric(admin, "pushgrid_room_refused_total", "reason=\"ip_cap\"").await >= 1.0);
    delete_setting(c, "room.max_conns_per_ip").await;

    // ---- Deny list: closed right after accept, with the reason.
    put_setting(c, "room.deny_cidrs", "127.0.0.23/32, 10.0.0.0/8").await;
    let denied = Ipv4Addr::new(127, 0, 0, 23);
    let error = until_some("a denied address is refused", move || async move {
        let mut stream = connect_from(denied, room).await;
        // The device reads first: the room answers before any AUTH.
        let mut buf = bytes::BytesMut::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(count) = stream.read_buf(&mut buf).await {
                if count == 0 {
                    break;
                }
            }
        })
        .await;
        match pushgrid_wire::decode_frame(&mut buf, 1 << 20) {
            // Until the setting reaches the room, the device is let in and
            // then refused for its missing AUTH: try again.
            Ok(pushgrid_wire::Decoded::Frame(frame)) if frame.op == Op::Error => frame
                .decode::<msg::Error>()
                .ok()
                .filter(|error| error.code() == msg::ErrorCode::Forbidden),
            _ => None,
        }
    })
    .await;
    assert!(error.message.contains("denied"), "{}", error.message);
    // Other addresses still get in; the deny list is lifted without a restart.
    try_auth(
        connect_from(Ipv4Addr::new(127, 0, 0, 24), room).await,
        auth(c, "deny-b"),
    )
    .await
    .unwrap();
    delete_setting(c, "room.deny_cidrs").await;
    until("the address is let in again", move || async move {
        try_auth(connect_from(denied, room).await, auth(c, "deny-c"))
            .await
            .is_ok()
    })
    .await;
    assert!(metric(admin, "pushgrid_room_refused_total", "reason=\"denied\"").await >= 1.0);

    // ---- Connect rate: one new connection per second per address.
    put_setting(c, "room.connect_rate_per_ip", "1").await;
    let fast = Ipv4Addr::new(127, 0, 0, 25);
    let limited = until_some(
        "a second connection within the second is refused",
        move || async move {
            let _ = try_auth(connect_from(fast, room).await, auth(c, "rate-a")).await;
            try_auth(connect_from(fast, room).await, auth(c, "rate-b"))
                .await
                .err()
        },
    )
    .await;
    assert_eq!(limited.code(), msg::ErrorCode::RateLimited);
    assert!(metric(admin, "pushgrid_room_refused_total", "reason=\"ip_rate\"").await >= 1.0);

    // A value that does not parse is ignored (and logged), not applied.
    put_setting(c, "room.max_conns_per_ip", "lots").await;
    until("the bad setting is reported", move || async move {
        c.rooms[0].log_text().contains("room.max_conns_per_ip")
    })
    .await;
    cluster.cleanup().await;
}

/// A room started under `prlimit --nofile=<files>`, with its bound addresses.
struct LimitedRoom {
    child: tokio::process::Child,
    bound: HashMap<String, SocketAddr>,
    log: std::path::PathBuf,
}

async fn start_limited_room(cluster: &TestCluster, files: u32) -> LimitedRoom {
    let mut args = cluster.node_args();
    for setting in [
        "tcp_listen=127.0.0.1:0",
        "auth_timeout_secs=5",
        "heartbeat_secs=30",
        "node_id=room-emfile",
    ] {
        args.push("--set".into());
        args.push(setting.into());
    }
    let log = cluster.dir.join("room-emfile.log");
    let mut child = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={files}:{files}"))
        .arg(pushgrid_e2e::binary("room"))
        .args(&args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .expect("prlimit (util-linux) runs the room");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut bound = HashMap::new();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() == 4 && parts[0] == pushgrid_common::net::BOUND_LINE_PREFIX {
                if parts[2] == "ready" {
                    return true;
                }
                bound.insert(parts[2].to_string(), parts[3].parse().unwrap());
            }
        }
        false
    })
    .await;
    assert_eq!(
        ready,
        Ok(true),
        "the limited room did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    LimitedRoom { child, bound, log }
}

/// User plus system CPU time of a process, in seconds (USER_HZ is 100).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; fields are counted after its ')'.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_does_not_spin_the_accept_loop() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let mut room = start_limited_room(&cluster, 64).await;
    let pid = room.child.id().unwrap();
    let addr = room.bound["tcp"];

    // More connections than the room has descriptors left: the kernel
    // completes them into the backlog, and accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let log = room.log.clone();
    let log = &log;
    until(
        "the room runs out of file descriptors",
        move || async move {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("Too many open files")
        },
    )
    .await;
    let before = cpu_seconds(pid);
    // A measuring window, not a wait: the CPU the room uses in 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds(pid) - before;
    // A spinning accept loop burns a whole core: about 3 s here. A guard
    // against spinning, not a speed figure.
    assert!(
        used < 0.5,
        "the room used {used:.2} s of CPU in 3 s at EMFILE"
    );
    assert!(matches!(room.child.try_wait(), Ok(None)), "the room died");

    // Once descriptors are free again it serves devices as before.
    drop(held);
    let auth = msg::Auth {
        token: cluster.app.token("after-emfile"),
        device_id: "d".into(),
        platform: "test".into(),
    };
    let auth = &auth;
    let mut device = until_some(
        "a device connects after the descriptors came back",
        move || async move {
            Connection::connect(&addr.to_string(), auth.clone())
                .await
                .ok()
                .map(|(connection, _)| connection)
        },
    )
    .await;
    device.send_empty(Op::Ping, 7).await.unwrap();
    let pong = next_frame(&mut device, WAIT).await.unwrap().unwrap();
    assert_eq!(pong.op, Op::Pong);
    let _ = room.child.kill().await;
    cluster.cleanup().await;
}
