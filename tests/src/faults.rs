//! Faults a test can inject into the services pushgrid depends on, without
//! touching the shared Redis and MariaDB that other tests use at the same
//! time: a private `redis-server` that can be restarted empty, and a TCP
//! proxy in front of MariaDB that can be cut and restored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

/// A `redis-server` of the test's own, on a unix socket in a directory of the
/// test's own (no TCP port to find or to lose), keeping nothing on disk.
pub struct OwnRedis {
    child: Child,
    dir: PathBuf,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        let dir = crate::temp_dir("pg-own-redis");
        OwnRedis::start_in(&dir)
            .await
            .unwrap_or_else(|| panic!("redis-server did not start in {}", dir.display()))
    }

    fn socket(dir: &Path) -> PathBuf {
        dir.join("redis.sock")
    }

    /// Starts on the socket of `dir` (a stale socket file is replaced); None
    /// when it does not answer within 5 s.
    async fn start_in(dir: &Path) -> Option<OwnRedis> {
        let socket = OwnRedis::socket(dir);
        let mut child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        // Polls every 20 ms, 250 times: a 5 s deadline.
        for _ in 0..250 {
            // The poll interval.
            tokio::time::sleep(Duration::from_millis(20)).await;
            if child.try_wait().ok().flatten().is_some() {
                return None;
            }
            if OwnRedis::answers(&socket).await {
                return Some(OwnRedis {
                    child,
                    dir: dir.to_path_buf(),
                });
            }
        }
        let _ = child.kill().await;
        None
    }

    async fn answers(socket: &Path) -> bool {
        let Ok(client) = redis::Client::open(format!("redis+unix://{}", socket.display())) else {
            return false;
        };
        let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", OwnRedis::socket(&self.dir).display())
    }

    /// A connection of the test's own (e.g. for CLIENT KILL).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("a redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("the test's redis answers")
    }

    /// kill -9: Redis is gone until [`OwnRedis::restart_empty`].
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// kill -9 (when running) and start again on the same socket: empty.
    pub async fn restart_empty(&mut self) {
        let _ = self.child.kill().await;
        for _ in 0..20 {
            if let Some(redis) = OwnRedis::start_in(&self.dir).await {
                *self = redis;
                return;
            }
            // Retry back-off before the next start (at most 20 tries).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server did not come back in {}", self.dir.display());
    }
}

/// A TCP proxy to the local MariaDB that the test can cut and restore: while
/// cut, every connection through it is closed and new ones are refused, as if
/// MySQL had stopped.
pub struct MysqlProxy {
    pub addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MysqlProxy {
    pub async fn start() -> MysqlProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        MysqlProxy {
            addr,
            task: Some(tokio::spawn(MysqlProxy::serve(listener))),
        }
    }

    async fn serve(listener: TcpListener) {
        // Aborting this task drops the JoinSet, which aborts every copy.
        let mut connections = JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            connections.spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:3306").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }

    /// The URL of `database` through the proxy.
    pub fn url(&self, database: &str) -> String {
        format!("mysql://root@{}/{database}", self.addr)
    }

    /// MySQL is gone: every connection closes, new ones are refused.
    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub async fn restore(&mut self) {
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(self.addr).await {
                self.task = Some(tokio::spawn(MysqlProxy::serve(listener)));
                return;
            }
            // Retry back-off until the port is free again (at most 100 tries).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot listen on {} again", self.addr);
    }
}
