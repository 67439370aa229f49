//! Device push tokens (issue 25) in the SQL store, on SQLite and on MariaDB:
//! registering moves a token to its new holder and replaces a device's
//! previous token, listing is per app and user, removal by token or by user,
//! a user's tokens are capped, and bad input is refused naming the field.
#![allow(clippy::unwrap_used)]

use pushgrid_proto::cluster::{DevicePushToken, TokenKey};
use pushgrid_saver::store::{MAX_TOKENS_PER_CALL, MAX_TOKENS_PER_USER, SqlStore};

const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

fn random_name(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

enum Cleanup {
    Directory(std::path::PathBuf),
    Database(String),
}

/// A fresh store: a SQLite file in a temporary directory, or a new MariaDB
/// database; [`finish`] drops it.
async fn store(mysql: bool) -> (SqlStore, Cleanup) {
    if mysql {
        let database = random_name("pg_tokens_");
        let store = SqlStore::connect(&format!("{MYSQL_SERVER}/{database}"))
            .await
            .unwrap();
        (store, Cleanup::Database(database))
    } else {
        let dir = std::env::temp_dir().join(random_name("pg_tokens_"));
        let url = format!("sqlite://{}", dir.join("saver.db").display());
        (
            SqlStore::connect(&url).await.unwrap(),
            Cleanup::Directory(dir),
        )
    }
}

async fn finish(store: SqlStore, cleanup: Cleanup) {
    match cleanup {
        Cleanup::Directory(dir) => {
            store.pool().close().await;
            let _ = std::fs::remove_dir_all(dir);
        }
        Cleanup::Database(database) => {
            let drop = format!("DROP DATABASE IF EXISTS `{database}`");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(store.pool())
                .await;
            store.pool().close().await;
        }
    }
}

fn apns(n: u32) -> String {
    format!("{n:064x}")
}

fn token(user: &str, device: &str, provider: &str, value: &str) -> DevicePushToken {
    DevicePushToken {
        user: user.into(),
        device: device.into(),
        platform: "ios".into(),
        provider: provider.into(),
        token: value.into(),
        bundle: "com.example.chat".into(),
        ..DevicePushToken::default()
    }
}

fn values(tokens: &[DevicePushToken]) -> Vec<String> {
    let mut values: Vec<String> = tokens.iter().map(|token| token.token.clone()).collect();
    values.sort();
    values
}

async fn registering_moves_and_replaces_tokens(mysql: bool) {
    let (store, cleanup) = store(mysql).await;
    let app = random_name("app");
    let first = vec![
        token("ann", "ann-phone", "apns", &apns(1)),
        token("ann", "ann-phone", "fcm", "fcm:first"),
        token("ann", "", "hms", "hms-first"),
    ];
    assert_eq!(store.register_tokens(&app, &first).await.unwrap(), 3);
    let listed = store.list_tokens(&app, "ann").await.unwrap();
    assert_eq!(
        values(&listed),
        vec![apns(1), "fcm:first".into(), "hms-first".into()]
    );
    let row = listed
        .iter()
        .find(|token| token.provider == "apns")
        .unwrap();
    assert_eq!(
        (
            row.device.as_str(),
            row.platform.as_str(),
            row.bundle.as_str()
        ),
        ("ann-phone", "ios", "com.example.chat")
    );
    assert!(row.created_ms > 0 && row.updated_ms >= row.created_ms);

    // The device's new APNs token replaces its old one and nothing else.
    store
        .register_tokens(&app, &[token("ann", "ann-phone", "apns", &apns(2))])
        .await
        .unwrap();
    let listed = store.list_tokens(&app, "ann").await.unwrap();
    assert_eq!(
        values(&listed),
        vec![apns(2), "fcm:first".into(), "hms-first".into()]
    );

    // A token registered by another user moves to that user.
    store
        .register_tokens(&app, &[token("bob", "bob-tab", "fcm", "fcm:first")])
        .await
        .unwrap();
    assert_eq!(
        values(&store.list_tokens(&app, "ann").await.unwrap()),
        vec![apns(2), "hms-first".into()]
    );
    assert_eq!(
        values(&store.list_tokens(&app, "bob").await.unwrap()),
        vec!["fcm:first".to_string()]
    );
    // Several users at once (what center's notifications read): each token
    // with its user; a user with none adds nothing.
    let users = ["ann".to_string(), "bob".to_string(), "nobody".to_string()];
    let mut both: Vec<(String, String)> = store
        .list_tokens_of_users(&app, &users)
        .await
        .unwrap()
        .into_iter()
        .map(|token| (token.user, token.token))
        .collect();
    both.sort();
    assert_eq!(
        both,
        vec![
            ("ann".to_string(), apns(2)),
            ("ann".to_string(), "hms-first".to_string()),
            ("bob".to_string(), "fcm:first".to_string()),
        ]
    );
    let too_many = vec!["u".to_string(); MAX_TOKENS_PER_CALL + 1];
    assert!(store.list_tokens_of_users(&app, &too_many).await.is_err());

    // Another app is another namespace.
    let other = random_name("app");
    assert!(store.list_tokens(&other, "ann").await.unwrap().is_empty());
    let key = |provider: &str, value: &str| TokenKey {
        provider: provider.into(),
        token: value.into(),
    };
    assert_eq!(
        store
            .remove_tokens(&other, &[key("fcm", "fcm:first")])
            .await
            .unwrap(),
        0
    );

    // Removal by token, then by user.
    assert_eq!(
        store
            .remove_tokens(&app, &[key("fcm", "fcm:first"), key("fcm", "never")])
            .await
            .unwrap(),
        1
    );
    assert!(store.list_tokens(&app, "bob").await.unwrap().is_empty());
    assert_eq!(store.remove_user_tokens(&app, "ann").await.unwrap(), 2);
    assert!(store.list_tokens(&app, "ann").await.unwrap().is_empty());
    finish(store, cleanup).await;
}

async fn a_users_tokens_are_capped_and_bad_input_is_refused(mysql: bool) {
    let (store, cleanup) = store(mysql).await;
    let app = random_name("app");
    let many: Vec<DevicePushToken> = (0..MAX_TOKENS_PER_USER as u32 + 5)
        .map(|n| token("cap", "", "apns", &apns(n)))
        .collect();
    store.register_tokens(&app, &many).await.unwrap();
    assert_eq!(
        store.list_tokens(&app, "cap").await.unwrap().len(),
        MAX_TOKENS_PER_USER
    );

    let too_many: Vec<DevicePushToken> = (0..MAX_TOKENS_PER_CALL as u32 + 1)
        .map(|n| token("u", "", "apns", &apns(n)))
        .collect();
    let cases = [
        (vec![token("u", "", "gcm", "abc")], "provider"),
        (vec![token("u", "", "apns", "abc")], "token"),
        (vec![token("u", "", "fcm", "a b")], "token"),
        (
            vec![DevicePushToken {
                bundle: String::new(),
                ..token("u", "", "fcm", "abc")
            }],
            "bundle",
        ),
        (vec![token("", "", "fcm", "abc")], "user"),
        (too_many, "tokens"),
    ];
    for (tokens, field) in cases {
        let error = store.register_tokens(&app, &tokens).await.unwrap_err();
        assert!(
            error.to_string().contains(field),
            "{error} names no {field}"
        );
    }
    assert!(store.list_tokens(&app, "u").await.unwrap().is_empty());
    finish(store, cleanup).await;
}

/// One device registering its token several times at once (an SDK resending
/// it after a reconnect while the first is still in flight): every call is
/// stored, and the user holds the token once. In MySQL the concurrent
/// DELETE + INSERT transactions deadlock; the victim is tried again.
async fn concurrent_registrations_of_one_token_all_succeed(mysql: bool) {
    let (store, cleanup) = store(mysql).await;
    let app = random_name("app");
    let calls = (0..8).map(|_| {
        let (store, app) = (store.clone(), app.clone());
        tokio::spawn(async move {
            store
                .register_tokens(&app, &[token("u", "phone", "apns", &apns(7))])
                .await
        })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap(), 1);
    }
    let held = store.list_tokens(&app, "u").await.unwrap();
    assert_eq!(values(&held), [apns(7)]);
    finish(store, cleanup).await;
}

mod sqlite {
    #[tokio::test]
    async fn concurrent_registrations_of_one_token_all_succeed() {
        super::concurrent_registrations_of_one_token_all_succeed(false).await;
    }

    #[tokio::test]
    async fn registering_moves_and_replaces_tokens() {
        super::registering_moves_and_replaces_tokens(false).await;
    }

    #[tokio::test]
    async fn a_users_tokens_are_capped_and_bad_input_is_refused() {
        super::a_users_tokens_are_capped_and_bad_input_is_refused(false).await;
    }
}

mod mysql {
    #[tokio::test]
    async fn concurrent_registrations_of_one_token_all_succeed() {
        super::concurrent_registrations_of_one_token_all_succeed(true).await;
    }

    #[tokio::test]
    async fn registering_moves_and_replaces_tokens() {
        super::registering_moves_and_replaces_tokens(true).await;
    }

    #[tokio::test]
    async fn a_users_tokens_are_capped_and_bad_input_is_refused() {
        super::a_users_tokens_are_capped_and_bad_input_is_refused(true).await;
    }
}
