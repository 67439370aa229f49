//! Finding and reaching a room: the targets to try (a KICK's redirect, the
//! dispatcher's answer, the configured addresses), one connect-and-AUTH per
//! target until one answers, and the TLS settings they share.

use pushgrid_wire::msg;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::worker::{ConnectOutcome, Interrupt, Worker};
use crate::address::{AddressError, RoomAddress, Transport};
use crate::connection::{ConnectOptions, Connection, TlsSettings};
use crate::dispatch::{DispatchedRoom, dispatch, user_from_token};
use crate::error::ClientError;

impl Worker {
    /// Room addresses to try, in order: a KICK redirect, then the dispatcher's
    /// rooms (or the configured addresses when there is no dispatcher or it fails).
    pub(super) async fn targets(&mut self) -> Result<Result<Vec<RoomAddress>, String>, Interrupt> {
        let mut addrs: Vec<RoomAddress> = std::mem::take(&mut self.redirect);
        let mut failure = None;
        if let Some(base) = self.config.dispatcher.clone() {
            match self.dispatched_addrs(&base).await? {
                Ok(dispatched) => addrs.extend(dispatched),
                Err(reason) => {
                    warn!(%reason, "dispatcher failed; falling back to configured addresses");
                    addrs.extend(self.configured.iter().cloned());
                    failure = Some(reason);
                }
            }
        } else {
            addrs.extend(self.configured.iter().cloned());
        }
        let mut unique = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if !unique.contains(&addr) {
                unique.push(addr);
            }
        }
        if unique.is_empty() {
            return Ok(Err(failure.unwrap_or_else(|| "no room address".into())));
        }
        Ok(Ok(unique))
    }

    pub(super) async fn dispatched_addrs(
        &mut self,
        base: &str,
    ) -> Result<Result<Vec<RoomAddress>, String>, Interrupt> {
        if let Some((addrs, expires)) = &self.dispatched
            && Instant::now() < *expires
        {
            return Ok(Ok(addrs.clone()));
        }
        let Some(http) = self.http.clone() else {
            return Ok(Err("no HTTP client for the dispatcher".into()));
        };
        let Some(user) = self
            .config
            .user
            .clone()
            .or_else(|| user_from_token(&self.config.token))
        else {
            return Ok(Err("cannot tell the user id for the dispatcher: set ClientConfig::user or use a JWT with a sub claim".into()));
        };
        let base = base.to_owned();
        let answer = self
            .idle(async move { dispatch(&http, &base, &user).await }, false)
            .await?;
        match answer {
            Ok(dispatch) => {
                let preferred = self.config.transport;
                let addrs: Vec<RoomAddress> = dispatch
                    .rooms
                    .iter()
                    .filter_map(|room| room.preferred_address(preferred))
                    .collect();
                debug!(?addrs, "dispatcher answered");
                self.known_rooms = dispatch.rooms;
                if addrs.is_empty() {
                    return Ok(Err(format!(
                        "the dispatcher offered no room reachable over {preferred} \
                         (a tls or wss preference never falls back to plain tcp or ws)"
                    )));
                }
                if !dispatch.ttl.is_zero() {
                    self.dispatched = Some((addrs.clone(), Instant::now() + dispatch.ttl));
                }
                Ok(Ok(addrs))
            }
            Err(error) => Ok(Err(error.to_string())),
        }
    }

    pub(super) async fn connect_any(&mut self) -> ConnectOutcome {
        let addrs = match self.targets().await {
            Err(Interrupt::Close(done)) => return ConnectOutcome::Close(done),
            Err(Interrupt::Reconnect) => return ConnectOutcome::AllFailed("interrupted".into()),
            Ok(Err(reason)) => return ConnectOutcome::AllFailed(reason),
            Ok(Ok(addrs)) => addrs,
        };
        let options = ConnectOptions {
            connect_timeout: self.config.connect_timeout,
            auth_timeout: self.config.auth_timeout,
            max_body: self.config.max_body,
            tls: self.config.tls.clone(),
        };
        let mut failures = Vec::new();
        for addr in addrs {
            let tls = if addr.transport().is_secure() {
                match self.tls_settings() {
                    Ok(tls) => Some(tls),
                    Err(error) => {
                        warn!(%addr, %error, "cannot connect over TLS");
                        failures.push(format!("{addr}: {error}"));
                        continue;
                    }
                }
            } else {
                None
            };
            let auth = msg::Auth {
                token: self.config.token.clone(),
                device_id: self.config.device_id.clone(),
                platform: self.config.platform.clone(),
            };
            let attempt = {
                let addr = addr.clone();
                let options = options.clone();
                async move { Connection::connect_prepared(&addr, auth, &options, tls.as_ref()).await }
            };
            match self.idle(attempt, false).await {
                Err(Interrupt::Close(done)) => return ConnectOutcome::Close(done),
                Err(Interrupt::Reconnect) => {}
                Ok(Ok((connection, auth_ok))) => {
                    return ConnectOutcome::Connected {
                        connection: Box::new(connection),
                        auth_ok,
                    };
                }
                Ok(Err(error)) if error.is_permanent_auth_failure() => {
                    if let ClientError::AuthRefused { code, message } = error {
                        return ConnectOutcome::AuthFailed { code, message };
                    }
                }
                Ok(Err(error)) => {
                    debug!(%addr, %error, "room attempt failed");
                    failures.push(format!("{addr}: {error}"));
                }
            }
        }
        ConnectOutcome::AllFailed(failures.join("; "))
    }

    /// The TLS settings, prepared on first use (a failure, such as an
    /// unreadable root file, is tried again next time).
    pub(super) fn tls_settings(&mut self) -> Result<TlsSettings, ClientError> {
        if let Some(tls) = &self.tls {
            return Ok(tls.clone());
        }
        let tls = self.config.tls.prepare()?;
        self.tls = Some(tls.clone());
        Ok(tls)
    }
}

/// Where a KICK's `reconnect_to` sends the device, in the order to try. An
/// address with a scheme names its transport. A bare `host:port` is, by the
/// room's rule, the target room's listener for the device's own transport when
/// that room has one, else its TCP listener: the last dispatcher answer tells
/// which when it lists the address, otherwise both are tried, the device's
/// transport first.
pub(super) fn redirect_targets(
    reconnect_to: &str,
    current: &RoomAddress,
    known_rooms: &[DispatchedRoom],
) -> Result<Vec<RoomAddress>, AddressError> {
    let reconnect_to = reconnect_to.trim();
    if reconnect_to.contains("://") {
        return Ok(vec![RoomAddress::parse(reconnect_to)?]);
    }
    let bare = RoomAddress::parse(reconnect_to)?;
    if current.transport() == Transport::Tcp {
        return Ok(vec![bare]);
    }
    let listed = |transport: Transport| {
        known_rooms
            .iter()
            .filter_map(|room| room.address(transport))
            .find(|address| address.host() == bare.host() && address.port() == bare.port())
    };
    if let Some(address) = listed(current.transport()) {
        return Ok(vec![address]);
    }
    if let Some(address) = listed(Transport::Tcp) {
        return Ok(vec![address]);
    }
    Ok(vec![current.with_endpoint(bare.host(), bare.port()), bare])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn room(tcp: &str, ws: Option<&str>, wss: Option<&str>) -> DispatchedRoom {
        DispatchedRoom {
            node: "room".into(),
            tcp: Some(tcp.into()),
            ws: ws.map(Into::into),
            tls: None,
            wss: wss.map(Into::into),
        }
    }

    fn targets(reconnect_to: &str, current: &str, known: &[DispatchedRoom]) -> Vec<String> {
        let current = RoomAddress::parse(current).unwrap();
        redirect_targets(reconnect_to, &current, known)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_kick_target_keeps_the_transport_of_the_connection() {
        // Plain TCP: a bare address is the TCP listener.
        assert_eq!(
            targets("10.0.0.2:8090", "10.0.0.1:8090", &[]),
            ["10.0.0.2:8090"]
        );
        // An explicit scheme wins.
        assert_eq!(
            targets("wss://push.example/d", "10.0.0.1:8090", &[]),
            ["wss://push.example:443/d"]
        );
        // Unknown bare address from a WebSocket connection: the same
        // transport (and path) first, then TCP.
        assert_eq!(
            targets("10.0.0.2:8091", "ws://10.0.0.1:8091/push", &[]),
            ["ws://10.0.0.2:8091/push", "10.0.0.2:8091"]
        );
        assert_eq!(
            targets("10.0.0.2:8443", "tls://10.0.0.1:8443", &[]),
            ["tls://10.0.0.2:8443", "10.0.0.2:8443"]
        );
        // The dispatcher listed it: no guessing.
        let known = [room(
            "10.0.0.2:8090",
            Some("10.0.0.2:8091"),
            Some("10.0.0.2:8444"),
        )];
        assert_eq!(
            targets("10.0.0.2:8444", "wss://10.0.0.1:8444/", &known),
            ["wss://10.0.0.2:8444/"]
        );
        assert_eq!(
            targets("10.0.0.2:8090", "wss://10.0.0.1:8444/", &known),
            ["10.0.0.2:8090"]
        );
    }

    #[test]
    fn a_bad_kick_target_is_an_error() {
        let current = RoomAddress::parse("ws://10.0.0.1:8091/").unwrap();
        assert!(redirect_targets("not an address", &current, &[]).is_err());
        assert!(redirect_targets("gopher://x:1", &current, &[]).is_err());
    }
}
