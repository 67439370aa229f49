//! Who may connect and under which limits: CIDR deny and allow lists, a cap
//! on connections per source address, a connect rate per source address, the
//! pre-auth deadline and the frame limits.
//!
//! Each limit is read from keeper's cluster-wide settings (`room.<key>`),
//! falling back to the room's own configuration, and follows every change of
//! the cluster view: an operator changes them without restarting rooms.
//!
//! | setting | value | default (room config) |
//! |---|---|---|
//! | `room.max_conns_per_ip` | connections, 0 = no cap | `max_conns_per_ip` |
//! | `room.connect_rate_per_ip` | new connections per second, 0 = no limit | `connect_rate_per_ip` |
//! | `room.allow_cidrs` | comma-separated CIDRs or addresses; empty = everyone | `allow_cidrs` |
//! | `room.deny_cidrs` | comma-separated CIDRs or addresses | `deny_cidrs` |
//! | `room.auth_timeout_secs` | seconds from accept to AUTH | `auth_timeout_secs` |
//! | `room.pre_auth_max_body` | body bytes before AUTH | `pre_auth_max_body` |
//! | `room.max_body` | body bytes after AUTH | `max_body` |
//! | `room.drain_window_secs` | seconds over which drained devices reconnect | `drain_window_secs` |

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use pushgrid_common::cluster::ClusterView;
use tokio::sync::OwnedSemaphorePermit;

use crate::RoomConfig;

/// The limits in force.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limits {
    pub max_conns_per_ip: u32,
    pub connect_rate_per_ip: u32,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub auth_timeout: Duration,
    pub pre_auth_max_body: u32,
    pub max_body: u32,
    pub drain_window: Duration,
}

/// Why a connection was turned away at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The source matches `deny_cidrs`.
    Denied,
    /// `allow_cidrs` is set and the source matches none of it.
    NotAllowed,
    /// The source holds `max_conns_per_ip` connections already.
    TooManyFromIp,
    /// The source connects faster than `connect_rate_per_ip`.
    RateLimited,
}

impl Refusal {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Denied => "denied",
            Refusal::NotAllowed => "not_allowed",
            Refusal::TooManyFromIp => "ip_cap",
            Refusal::RateLimited => "ip_rate",
        }
    }

    /// What the device reads in the ERROR frame.
    pub fn message(self, limits: &Limits) -> String {
        match self {
            Refusal::Denied => "your address is denied".into(),
            Refusal::NotAllowed => "your address is not allowed".into(),
            Refusal::TooManyFromIp => format!(
                "too many connections from your address (at most {})",
                limits.max_conns_per_ip
            ),
            Refusal::RateLimited => format!(
                "connecting too fast from your address (at most {} per second)",
                limits.connect_rate_per_ip
            ),
        }
    }

    /// Address lists close at once; the others get a polite ERROR frame.
    pub fn is_list(self) -> bool {
        matches!(self, Refusal::Denied | Refusal::NotAllowed)
    }
}

fn parse_cidrs(text: &str) -> Result<Vec<IpNet>, String> {
    text.split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            IpNet::from_str(item)
                .or_else(|_| IpAddr::from_str(item).map(IpNet::from))
                .map_err(|_| format!("{item:?} is not a CIDR (10.0.0.0/8) or an address"))
        })
        .collect()
}

impl Limits {
    /// The room's configuration, then keeper's settings over it. A setting
    /// that does not parse is reported and the configured value kept.
    pub fn resolve(config: &RoomConfig, view: Option<&ClusterView>) -> (Limits, Vec<String>) {
        let mut errors = Vec::new();
        let mut config_cidrs = |name: &str, list: &[String]| {
            parse_cidrs(&list.join(",")).unwrap_or_else(|error| {
                errors.push(format!("config {name}: {error}"));
                Vec::new()
            })
        };
        let mut limits = Limits {
            max_conns_per_ip: config.max_conns_per_ip,
            connect_rate_per_ip: config.connect_rate_per_ip,
            allow: config_cidrs("allow_cidrs", &config.allow_cidrs),
            deny: config_cidrs("deny_cidrs", &config.deny_cidrs),
            auth_timeout: Duration::from_secs(u64::from(config.auth_timeout_secs.max(1))),
            pre_auth_max_body: config.pre_auth_max_body,
            max_body: config.max_body,
            drain_window: Duration::from_secs(u64::from(config.drain_window_secs)),
        };
        let Some(view) = view else {
            return (limits, errors);
        };
        let mut number = |name: &str, slot: &mut u32| {
            if let Some(text) = view.setting(name) {
                match text.trim().parse::<u32>() {
                    Ok(value) => *slot = value,
                    Err(_) => errors.push(format!("setting {name}={text:?}: not a whole number")),
                }
            }
        };
        number("room.max_conns_per_ip", &mut limits.max_conns_per_ip);
        number("room.connect_rate_per_ip", &mut limits.connect_rate_per_ip);
        number("room.pre_auth_max_body", &mut limits.pre_auth_max_body);
        number("room.max_body", &mut limits.max_body);
        let mut auth_timeout_secs = limits.auth_timeout.as_secs() as u32;
        number("room.auth_timeout_secs", &mut auth_timeout_secs);
        limits.auth_timeout = Duration::from_secs(u64::from(auth_timeout_secs.max(1)));
        let mut drain_window_secs = limits.drain_window.as_secs() as u32;
        number("room.drain_window_secs", &mut drain_window_secs);
        limits.drain_window = Duration::from_secs(u64::from(drain_window_secs));
        for (name, slot) in [
            ("room.allow_cidrs", &mut limits.allow),
            ("room.deny_cidrs", &mut limits.deny),
        ] {
            if let Some(text) = view.setting(name) {
                match parse_cidrs(text) {
                    Ok(list) => *slot = list,
                    Err(error) => errors.push(format!("setting {name}: {error}")),
                }
            }
        }
        (limits, errors)
    }
}

/// Admission state shared by every listener of a room.
pub(crate) struct Admission {
    limits: RwLock<Arc<Limits>>,
    /// `limits.max_body`, read for every frame.
    max_body: AtomicU32,
    /// Open connections (authenticated or not) per source address.
    per_ip: DashMap<IpAddr, u32>,
    rate: RwLock<Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>>,
}

/// A place taken by one connection of `ip`; given back on drop.
pub(crate) struct IpSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.admission.release(self.ip);
    }
}

fn limiter(per_second: u32) -> Option<Arc<DefaultKeyedRateLimiter<IpAddr>>> {
    NonZeroU32::new(per_second).map(|rate| Arc::new(RateLimiter::keyed(Quota::per_second(rate))))
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            max_body: AtomicU32::new(limits.max_body),
            rate: RwLock::new(limiter(limits.connect_rate_per_ip)),
            limits: RwLock::new(Arc::new(limits)),
            per_ip: DashMap::new(),
        }
    }

    pub fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn max_body(&self) -> u32 {
        self.max_body.load(Ordering::Relaxed)
    }

    /// Puts new limits in force; true when they changed.
    pub fn update(&self, limits: Limits) -> bool {
        let mut current = self
            .limits
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if **current == limits {
            return false;
        }
        if current.connect_rate_per_ip != limits.connect_rate_per_ip {
            *self
                .rate
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                limiter(limits.connect_rate_per_ip);
        }
        self.max_body.store(limits.max_body, Ordering::Relaxed);
        *current = Arc::new(limits);
        true
    }

    /// Lets a connection from `ip` in, or says why not. The slot must live as
    /// long as the connection.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, Refusal> {
        let ip = ip.to_canonical();
        let limits = self.limits();
        if limits.deny.iter().any(|net| net.contains(&ip)) {
            return Err(Refusal::Denied);
        }
        if !limits.allow.is_empty() && !limits.allow.iter().any(|net| net.contains(&ip)) {
            return Err(Refusal::NotAllowed);
        }
        let rate = self
            .rate
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if let Some(rate) = rate
            && rate.check_key(&ip).is_err()
        {
            return Err(Refusal::RateLimited);
        }
        let mut held = self.per_ip.entry(ip).or_insert(0);
        if limits.max_conns_per_ip > 0 && *held >= limits.max_conns_per_ip {
            drop(held);
            self.per_ip.remove_if(&ip, |_, count| *count == 0);
            return Err(Refusal::TooManyFromIp);
        }
        *held += 1;
        Ok(IpSlot {
            admission: self.clone(),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        if let Some(mut held) = self.per_ip.get_mut(&ip) {
            *held = held.saturating_sub(1);
        }
        self.per_ip.remove_if(&ip, |_, count| *count == 0);
    }

    /// Forgets rate state of addresses that went quiet (called periodically).
    pub fn tidy(&self) {
        let rate = self
            .rate
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if let Some(rate) = rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    }
}

/// What an open connection holds of the room's limits: its place among the
/// room's connections and among its source address's. Given back on drop.
pub(crate) struct Lease {
    _ip: IpSlot,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    pub fn new(ip: IpSlot, permit: OwnedSemaphorePermit) -> Self {
        Lease {
            _ip: ip,
            _permit: permit,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits() -> Limits {
        Limits::resolve(&RoomConfig::default(), None).0
    }

    #[test]
    fn cidr_lists_parse_addresses_and_networks_and_name_bad_items() {
        let list = parse_cidrs("10.0.0.0/8, 127.0.0.5 ::1").unwrap();
        assert_eq!(list.len(), 3);
        assert!(list[0].contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
        assert!(list[1].contains(&"127.0.0.5".parse::<IpAddr>().unwrap()));
        assert!(!list[1].contains(&"127.0.0.6".parse::<IpAddr>().unwrap()));
        let error = parse_cidrs("10.0.0.0/8,nonsense").unwrap_err();
        assert!(error.contains("nonsense"), "{error}");
    }

    #[test]
    fn deny_allow_cap_and_rate_refuse_in_that_order() {
        let admission = Arc::new(Admission::new(Limits {
            deny: parse_cidrs("127.0.0.9").unwrap(),
            allow: parse_cidrs("127.0.0.0/8").unwrap(),
            max_conns_per_ip: 2,
            ..limits()
        }));
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(
            admission.admit(ip("127.0.0.9")).err(),
            Some(Refusal::Denied)
        );
        assert_eq!(
            admission.admit(ip("10.0.0.1")).err(),
            Some(Refusal::NotAllowed)
        );
        let first = admission.admit(ip("127.0.0.2")).unwrap();
        let _second = admission.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(
            admission.admit(ip("127.0.0.2")).err(),
            Some(Refusal::TooManyFromIp)
        );
        assert!(admission.admit(ip("127.0.0.3")).is_ok(), "per address");
        drop(first);
        let _third = admission.admit(ip("127.0.0.2")).unwrap();

        // The rate applies from the next admission on, without a restart.
        assert!(admission.update(Limits {
            connect_rate_per_ip: 1,
            max_conns_per_ip: 0,
            ..limits()
        }));
        let _one = admission.admit(ip("127.0.0.4")).unwrap();
        assert_eq!(
            admission.admit(ip("127.0.0.4")).err(),
            Some(Refusal::RateLimited)
        );
        assert!(
            admission.admit(ip("::ffff:127.0.0.5")).is_ok(),
            "mapped addresses count as IPv4"
        );
    }

    #[test]
    fn slots_are_given_back() {
        let admission = Arc::new(Admission::new(limits()));
        let slot = admission.admit("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(admission.per_ip.len(), 1);
        drop(slot);
        assert!(admission.per_ip.is_empty());
    }
}
