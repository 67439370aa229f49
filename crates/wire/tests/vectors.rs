//! The shared frame test vectors, `proto/testdata/frames.json`: frames of
//! every type with every field set, as hex bytes, plus each body in the proto3
//! JSON mapping. This test holds the Rust codec to them in both directions
//! (encoding gives these bytes, decoding these bytes gives the message); the
//! TypeScript SDK's codec test (sdk/web/test/codec.test.ts) does the same with
//! the same file. `PUSHGRID_UPDATE_VECTORS=1` writes the file from the Rust
//! codec before checking it.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use prost::Message;
use pushgrid_wire::{Decoded, Op, decode_frame, encode, encode_empty, msg};
use serde_json::{Value, json};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../proto/testdata/frames.json"
);

type Check = Box<dyn Fn(&[u8])>;

struct Vector {
    name: &'static str,
    op: Op,
    seq: u32,
    bytes: bytes::Bytes,
    body: Value,
    /// Decodes a body and checks it equals what was encoded.
    check: Check,
}

fn vector<M: Message + Default + PartialEq + Clone + std::fmt::Debug + 'static>(
    name: &'static str,
    op: Op,
    seq: u32,
    message: M,
    body: Value,
) -> Vector {
    let expected = message.clone();
    Vector {
        name,
        op,
        seq,
        bytes: encode(op, seq, &message),
        body,
        check: Box::new(move |bytes| assert_eq!(M::decode(bytes).unwrap(), expected, "{name}")),
    }
}

fn empty(name: &'static str, op: Op, seq: u32) -> Vector {
    Vector {
        name,
        op,
        seq,
        bytes: encode_empty(op, seq),
        body: json!({}),
        check: Box::new(|bytes| assert!(bytes.is_empty())),
    }
}

fn vectors() -> Vec<Vector> {
    vec![
        vector(
            "auth",
            Op::Auth,
            1,
            msg::Auth {
                token: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln".into(),
                device_id: "alice-browser".into(),
                platform: "web".into(),
            },
            json!({"token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln",
                   "deviceId": "alice-browser", "platform": "web"}),
        ),
        vector(
            "auth_ok",
            Op::AuthOk,
            1,
            msg::AuthOk {
                conn_id: 1_838_707_836_638_208,
                heartbeat_secs: 60,
                server_time_ms: 1_764_000_000_123,
            },
            json!({"connId": "1838707836638208", "heartbeatSecs": 60,
                   "serverTimeMs": "1764000000123"}),
        ),
        empty("ping", Op::Ping, 0),
        empty("pong", Op::Pong, u32::MAX),
        vector(
            "push_unicast",
            Op::Push,
            0,
            msg::Push {
                msg_id: 383_970_161_369_042_944,
                kind: msg::PushKind::Unicast as i32,
                topic: String::new(),
                offset: 0,
                epoch: 0,
                payload: "héllo, wörld ✓".as_bytes().to_vec().into(),
                created_ms: 1_764_000_000_000,
            },
            json!({"msgId": "383970161369042944", "payload": "aMOpbGxvLCB3w7ZybGQg4pyT",
                   "createdMs": "1764000000000"}),
        ),
        vector(
            "push_broadcast",
            Op::Push,
            2,
            msg::Push {
                msg_id: u64::MAX,
                kind: msg::PushKind::Broadcast as i32,
                topic: "news/eu".into(),
                offset: 1_234_567,
                epoch: 1_764_000_000_999,
                payload: vec![0, 1, 2, 0x7f, 0x80, 0xfe, 0xff].into(),
                created_ms: 1,
            },
            json!({"msgId": "18446744073709551615", "kind": "PUSH_KIND_BROADCAST",
                   "topic": "news/eu", "offset": "1234567", "epoch": "1764000000999",
                   "payload": "AAECf4D+/w==", "createdMs": "1"}),
        ),
        vector(
            "push_multicast",
            Op::Push,
            0,
            msg::Push {
                msg_id: 1,
                kind: msg::PushKind::Multicast as i32,
                payload: b"m".to_vec().into(),
                ..Default::default()
            },
            json!({"msgId": "1", "kind": "PUSH_KIND_MULTICAST", "payload": "bQ=="}),
        ),
        vector(
            "ack",
            Op::Ack,
            0,
            msg::Ack {
                msg_ids: vec![1, 127, 128, 383_970_161_369_042_944, u64::MAX],
            },
            json!({"msgIds": ["1", "127", "128", "383970161369042944", "18446744073709551615"]}),
        ),
        vector("ack_empty", Op::Ack, 0, msg::Ack::default(), json!({})),
        vector(
            "upstream",
            Op::Upstream,
            42,
            msg::Upstream {
                product: "chat".into(),
                r#type: "text".into(),
                client_msg_id: "c-1".into(),
                payload: b"hi".to_vec().into(),
            },
            json!({"product": "chat", "type": "text", "clientMsgId": "c-1", "payload": "aGk="}),
        ),
        vector(
            "upstream_ok",
            Op::UpstreamOk,
            42,
            msg::UpstreamOk {
                client_msg_id: "c-1".into(),
            },
            json!({"clientMsgId": "c-1"}),
        ),
        vector(
            "sub",
            Op::Sub,
            0,
            msg::Sub {
                topic: "news/eu".into(),
                since_offset: 1_234_560,
                epoch: 1_764_000_000_999,
            },
            json!({"topic": "news/eu", "sinceOffset": "1234560", "epoch": "1764000000999"}),
        ),
        vector(
            "sub_ok",
            Op::SubOk,
            0,
            msg::SubOk {
                topic: "news/eu".into(),
                recovered: true,
                offset: 1_234_567,
                epoch: 1_764_000_000_999,
            },
            json!({"topic": "news/eu", "recovered": true, "offset": "1234567",
                   "epoch": "1764000000999"}),
        ),
        vector(
            "unsub",
            Op::Unsub,
            0,
            msg::Unsub {
                topic: "news/eu".into(),
            },
            json!({"topic": "news/eu"}),
        ),
        vector(
            "kick",
            Op::Kick,
            0,
            msg::Kick {
                code: msg::KickCode::Shutdown as i32,
                reason: "room draining".into(),
                reconnect_after_ms: 1500,
                reconnect_to: "127.0.0.1:8091".into(),
            },
            json!({"code": "KICK_CODE_SHUTDOWN", "reason": "room draining",
                   "reconnectAfterMs": 1500, "reconnectTo": "127.0.0.1:8091"}),
        ),
        vector(
            "error",
            Op::Error,
            1,
            msg::Error {
                code: msg::ErrorCode::AuthFailed as i32,
                message: "token expired".into(),
            },
            json!({"code": "ERROR_CODE_AUTH_FAILED", "message": "token expired"}),
        ),
        vector(
            "push_token",
            Op::PushToken,
            3,
            msg::PushToken {
                provider: "apns".into(),
                token: "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0".into(),
                bundle: "com.example.chat".into(),
            },
            json!({"provider": "apns",
                   "token": "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0",
                   "bundle": "com.example.chat"}),
        ),
        vector(
            "push_token_ok",
            Op::PushTokenOk,
            3,
            msg::PushTokenOk {
                provider: "fcm".into(),
                token: "dGVzdA:APA91bH-x_y".into(),
            },
            json!({"provider": "fcm", "token": "dGVzdA:APA91bH-x_y"}),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
        .collect()
}

fn table() -> Value {
    let frames: Vec<Value> = vectors()
        .iter()
        .map(|vector| {
            json!({
                "name": vector.name,
                "op": vector.op as u8,
                "seq": vector.seq,
                "body": vector.body,
                "hex": hex(&vector.bytes),
            })
        })
        .collect();
    json!({
        "about": "Device frames of every type, written by the Rust codec \
                  (crates/wire/tests/vectors.rs, PUSHGRID_UPDATE_VECTORS=1) and checked \
                  both ways by it and by the TypeScript SDK (sdk/web/test/codec.test.ts). \
                  body: the frame's protobuf message in the proto3 JSON mapping; \
                  hex: the whole frame, header included.",
        "frames": frames,
    })
}

#[test]
fn the_rust_codec_writes_and_reads_the_shared_vectors() {
    let table = table();
    if std::env::var_os("PUSHGRID_UPDATE_VECTORS").is_some() {
        std::fs::write(PATH, serde_json::to_string_pretty(&table).unwrap() + "\n").unwrap();
    }
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    assert_eq!(
        committed, table,
        "{PATH} differs from what the Rust codec writes (PUSHGRID_UPDATE_VECTORS=1 rewrites it)"
    );

    // Reading: every committed frame decodes to the message it was made from.
    let vectors = vectors();
    let frames = committed["frames"].as_array().unwrap();
    assert_eq!(frames.len(), vectors.len());
    let mut ops_seen = std::collections::BTreeSet::new();
    for (frame, vector) in frames.iter().zip(&vectors) {
        let bytes = unhex(frame["hex"].as_str().unwrap());
        let mut buffer = BytesMut::from(&bytes[..]);
        let Decoded::Frame(decoded) = decode_frame(&mut buffer, 64 * 1024).unwrap() else {
            panic!("{}: incomplete", vector.name)
        };
        assert!(buffer.is_empty(), "{}: bytes left over", vector.name);
        assert_eq!(decoded.op, vector.op, "{}", vector.name);
        assert_eq!(decoded.seq, vector.seq, "{}", vector.name);
        (vector.check)(&decoded.body);
        ops_seen.insert(vector.op as u8);
    }
    assert_eq!(
        ops_seen.into_iter().collect::<Vec<_>>(),
        (1..=15).collect::<Vec<u8>>(),
        "a vector for every op"
    );
}
