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

/// A `redis-server` of the test's own on a random port, keeping nothing on disk.
pub struct OwnRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        let dir = crate::temp_dir("pg-own-redis");
        for _ in 0..50 {
            let port = 20_000 + rand::random::<u16>() % 40_000;
            if let Some(redis) = OwnRedis::start_on(port, &dir).await {
                return redis;
            }
        }
        panic!("no port for redis-server");
    }

    /// Starts on `port`; None when the port is taken.
    async fn start_on(port: u16, dir: &Path) -> Option<OwnRedis> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if child.try_wait().ok().flatten().is_some() {
                return None;
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(OwnRedis {
                    child,
                    port,
                    dir: dir.to_path_buf(),
                });
            }
        }
        let _ = child.kill().await;
        None
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// kill -9 and start again on the same port: empty.
    pub async fn restart_empty(&mut self) {
        let _ = self.child.kill().await;
        for _ in 0..100 {
            if let Some(redis) = OwnRedis::start_on(self.port, &self.dir).await {
                *self = redis;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server did not come back on port {}", self.port);
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
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot listen on {} again", self.addr);
    }
}
