//! Listener helpers: binding, advertised addresses and the bound-address line
//! that test harnesses and the cluster launcher read from a role's stdout.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Prefix of the line a process prints on stdout for every listener it bound.
pub const BOUND_LINE_PREFIX: &str = "PUSHGRID_BOUND";

/// Prefix of the lines `pushgrid cluster` prints for its role processes:
/// `PUSHGRID_CHILD <instance> started <pid>` and
/// `PUSHGRID_CHILD <instance> exited <status>`.
pub const CHILD_LINE_PREFIX: &str = "PUSHGRID_CHILD";

/// One machine line of `pushgrid cluster`'s stdout, as its readers (the
/// tests' and the load test's launcher handles) see it. The launcher copies
/// each role's stdout lines prefixed by `[<instance>] `.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherLine<'a> {
    /// `PUSHGRID_BOUND cluster <listener> <addr>`: the launcher's own
    /// listener, or `ready` once every role is up.
    Own {
        listener: &'a str,
        addr: &'a str,
    },
    Started {
        instance: &'a str,
        pid: u32,
    },
    Exited {
        instance: &'a str,
    },
    /// `[<instance>] PUSHGRID_BOUND <role> <listener> <addr>`.
    Bound {
        instance: &'a str,
        listener: &'a str,
        addr: &'a str,
    },
    /// `[<instance>] PUSHGRID_BOUND <role> ready ...`.
    Ready {
        instance: &'a str,
    },
}

impl<'a> LauncherLine<'a> {
    /// The machine line `line` is, if it is one.
    pub fn parse(line: &'a str) -> Option<LauncherLine<'a>> {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [BOUND_LINE_PREFIX, "cluster", listener, addr] => {
                Some(LauncherLine::Own { listener, addr })
            }
            [CHILD_LINE_PREFIX, instance, "started", pid] => Some(LauncherLine::Started {
                instance,
                pid: pid.parse().ok()?,
            }),
            [CHILD_LINE_PREFIX, instance, "exited", ..] => Some(LauncherLine::Exited { instance }),
            [tag, BOUND_LINE_PREFIX, _role, listener, addr] => {
                let instance = tag.strip_prefix('[')?.strip_suffix(']')?;
                Some(if *listener == "ready" {
                    LauncherLine::Ready { instance }
                } else {
                    LauncherLine::Bound {
                        instance,
                        listener,
                        addr,
                    }
                })
            }
            _ => None,
        }
    }
}

/// What `pushgrid cluster`'s machine lines said so far about one instance.
#[derive(Debug, Default, Clone)]
pub struct LaunchedInstance {
    /// The running process, 0 while it is down.
    pub pid: u32,
    /// Starts so far (the first start counts).
    pub starts: u32,
    pub exits: u32,
    /// `ready` lines so far.
    pub ready: u32,
    /// Listener name -> address, as last announced.
    pub bound: HashMap<String, String>,
}

/// Everything `pushgrid cluster`'s machine lines said so far: the launcher's
/// own listeners (and `ready`) and each instance's state. Fed line by line.
#[derive(Debug, Default)]
pub struct LauncherRecord {
    pub own: HashMap<String, String>,
    pub instances: HashMap<String, LaunchedInstance>,
}

impl LauncherRecord {
    /// Takes in one stdout line of the launcher; other lines change nothing.
    pub fn note(&mut self, line: &str) {
        match LauncherLine::parse(line) {
            Some(LauncherLine::Own { listener, addr }) => {
                self.own.insert(listener.to_string(), addr.to_string());
            }
            Some(LauncherLine::Started { instance, pid }) => {
                let state = self.instance(instance);
                state.pid = pid;
                state.starts += 1;
            }
            Some(LauncherLine::Exited { instance }) => {
                let state = self.instance(instance);
                state.pid = 0;
                state.exits += 1;
            }
            Some(LauncherLine::Bound {
                instance,
                listener,
                addr,
            }) => {
                let state = self.instance(instance);
                state.bound.insert(listener.to_string(), addr.to_string());
            }
            Some(LauncherLine::Ready { instance }) => self.instance(instance).ready += 1,
            None => {}
        }
    }

    fn instance(&mut self, name: &str) -> &mut LaunchedInstance {
        self.instances.entry(name.to_string()).or_default()
    }
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind(addr: &str) -> crate::StartResult<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| crate::StartError::Listen {
            addr: addr.to_string(),
            error,
        })
}

/// An HTTP listener whose accepted connections have TCP_NODELAY set: a
/// response written in parts must not wait for the client's delayed ACK.
pub fn http_listener(
    listener: TcpListener,
) -> axum::serve::TapIo<TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn no_delay(stream: &mut tokio::net::TcpStream) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
        }
    }
    listener.tap_io(no_delay as fn(&mut tokio::net::TcpStream))
}

/// Where [`announce`] writes: 0 stdout, 1 stderr, 2 the log.
static ANNOUNCE_TO: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sends the bound-address lines of this process to stderr instead of stdout
/// (`pushgrid dev` keeps its stdout for the human banner unless asked for
/// the machine lines with `--machine-lines`).
pub fn announce_on_stderr() {
    ANNOUNCE_TO.store(1, std::sync::atomic::Ordering::Relaxed);
}

/// Sends the bound-address lines to the log (an info line), for `pushgrid
/// dev` in a terminal, whose screen holds only the banner.
pub fn announce_in_log() {
    ANNOUNCE_TO.store(2, std::sync::atomic::Ordering::Relaxed);
}

/// Prints `PUSHGRID_BOUND <role> <name> <addr>` on stdout (or stderr or the
/// log, see [`announce_on_stderr`] and [`announce_in_log`]) and flushes it.
pub fn announce(role: &str, name: &str, addr: SocketAddr) {
    let line = format!("{BOUND_LINE_PREFIX} {role} {name} {addr}");
    match ANNOUNCE_TO.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        }
        1 => {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        _ => tracing::info!("{line}"),
    }
}

/// The address others should dial to reach `bound`: `advertise_host` when set,
/// else the bound IP (a wildcard bind falls back to 127.0.0.1).
pub fn advertised(bound: SocketAddr, advertise_host: &str) -> String {
    if !advertise_host.is_empty() {
        return format!("{advertise_host}:{}", bound.port());
    }
    if bound.ip().is_unspecified() {
        return format!("127.0.0.1:{}", bound.port());
    }
    bound.to_string()
}

/// `host:port` or a URI, as a URI tonic can dial.
pub fn grpc_uri(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_starts_exits_readiness_and_addresses() {
        let mut record = LauncherRecord::default();
        for line in [
            "PUSHGRID_BOUND cluster admin 127.0.0.1:9000",
            "PUSHGRID_CHILD room-0 started 41",
            "[room-0] PUSHGRID_BOUND room tcp 127.0.0.1:8090",
            "[room-0] PUSHGRID_BOUND room ready -",
            "[room-0] something else",
            "PUSHGRID_CHILD room-0 exited signal 9",
            "PUSHGRID_CHILD room-0 started 42",
        ] {
            record.note(line);
        }
        assert_eq!(record.own["admin"], "127.0.0.1:9000");
        let room = &record.instances["room-0"];
        assert_eq!(
            (room.pid, room.starts, room.exits, room.ready),
            (42, 2, 1, 1)
        );
        assert_eq!(room.bound["tcp"], "127.0.0.1:8090");
        assert_eq!(record.instances.len(), 1);
    }

    #[test]
    fn launcher_lines_are_read_and_other_lines_are_not() {
        let cases = [
            (
                "PUSHGRID_BOUND cluster admin 127.0.0.1:9000",
                Some(LauncherLine::Own {
                    listener: "admin",
                    addr: "127.0.0.1:9000",
                }),
            ),
            (
                "PUSHGRID_CHILD room-0 started 41",
                Some(LauncherLine::Started {
                    instance: "room-0",
                    pid: 41,
                }),
            ),
            ("PUSHGRID_CHILD room-0 started x", None),
            (
                "PUSHGRID_CHILD room-0 exited signal 9",
                Some(LauncherLine::Exited { instance: "room-0" }),
            ),
            (
                "[room-0] PUSHGRID_BOUND room tcp 127.0.0.1:8090",
                Some(LauncherLine::Bound {
                    instance: "room-0",
                    listener: "tcp",
                    addr: "127.0.0.1:8090",
                }),
            ),
            (
                "[room-0] PUSHGRID_BOUND room ready -",
                Some(LauncherLine::Ready { instance: "room-0" }),
            ),
            ("room-0 PUSHGRID_BOUND room tcp 127.0.0.1:8090", None),
            ("[room-0] something else", None),
            ("", None),
        ];
        for (line, expected) in cases {
            assert_eq!(LauncherLine::parse(line), expected, "{line:?}");
        }
    }
}
