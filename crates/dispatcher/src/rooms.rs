//! The rooms a dispatcher can offer, rebuilt from every keeper view, and the
//! choice for one device: rooms of its network in its region, the balancer's
//! order, and another region only when its own has no room up.
//!
//! Rooms describe themselves with labels (`region`, `net`, `isp`, each one
//! value or a comma-separated list; a room without a label serves every value
//! of it), `capacity` (its connection cap) and optionally `tls_addr`, `wss_addr` and
//! `draining = "true"`; keeper adds the live connection count (`load`).

use pushgrid_common::cluster::ClusterView;
use pushgrid_proto::cluster::{NodeInfo, Role};

use crate::balancer::{Balancer, Candidate};

/// A device's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Wifi,
    Cellular,
}

impl Net {
    pub fn parse(value: &str) -> Option<Net> {
        match value.to_ascii_lowercase().as_str() {
            "wifi" => Some(Net::Wifi),
            "cellular" => Some(Net::Cellular),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Net::Wifi => "wifi",
            Net::Cellular => "cellular",
        }
    }
}

/// A room as the dispatcher offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomEntry {
    pub id: String,
    pub tcp: String,
    pub ws: Option<String>,
    pub tls: Option<String>,
    /// WebSocket over TLS (label `wss_addr`).
    pub wss: Option<String>,
    /// Lowercased; `None` serves every region.
    pub region: Option<String>,
    /// Lowercased; empty serves every network.
    pub nets: Vec<String>,
    /// Lowercased; empty serves every ISP.
    pub isps: Vec<String>,
    /// Free connection slots (capacity minus load), at least 1.
    pub weight: u64,
    /// Live in keeper's view with a TCP address, not full, not draining.
    pub up: bool,
}

impl RoomEntry {
    fn from_node(node: &NodeInfo, default_capacity: u64) -> RoomEntry {
        let label = |name: &str| {
            node.labels
                .get(name)
                .map(|value| value.trim())
                .filter(|value| !value.is_empty())
        };
        let list = |name: &str| -> Vec<String> {
            label(name)
                .map(|value| {
                    value
                        .split(',')
                        .map(|item| item.trim().to_ascii_lowercase())
                        .filter(|item| !item.is_empty() && item != "*" && item != "any")
                        .collect()
                })
                .unwrap_or_default()
        };
        let capacity = label("capacity")
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(default_capacity);
        let draining = label("draining").is_some_and(|value| value.eq_ignore_ascii_case("true"));
        let nonempty = |value: &str| (!value.is_empty()).then(|| value.to_string());
        RoomEntry {
            id: node.id.clone(),
            tcp: node.tcp_addr.clone(),
            ws: nonempty(&node.ws_addr),
            tls: label("tls_addr").map(str::to_string),
            wss: label("wss_addr").map(str::to_string),
            region: label("region")
                .filter(|region| *region != "*" && *region != "any")
                .map(str::to_ascii_lowercase),
            nets: list("net"),
            isps: list("isp"),
            weight: capacity.saturating_sub(node.load).max(1),
            up: !node.tcp_addr.is_empty() && node.load < capacity && !draining,
        }
    }

    fn serves_net(&self, net: Option<Net>) -> bool {
        match net {
            None => true,
            Some(net) => self.nets.is_empty() || self.nets.iter().any(|item| item == net.as_str()),
        }
    }

    fn serves_region(&self, region: Option<&str>) -> bool {
        match (region, &self.region) {
            (None, _) | (_, None) => true,
            (Some(wanted), Some(own)) => own == wanted,
        }
    }

    fn lists_isp(&self, isp: Option<&str>) -> bool {
        isp.is_some_and(|isp| self.isps.iter().any(|item| item == isp))
    }

    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            id: &self.id,
            weight: self.weight,
            up: self.up,
        }
    }
}

/// Every room in one keeper view, ordered by id.
#[derive(Debug, Clone, Default)]
pub struct RoomTable {
    pub version: u64,
    pub rooms: Vec<RoomEntry>,
}

impl RoomTable {
    /// `default_capacity` is the capacity of rooms that publish none.
    pub fn from_view(view: &ClusterView, default_capacity: u64) -> RoomTable {
        RoomTable {
            version: view.version,
            rooms: view
                .nodes_of(Role::Room)
                .map(|node| RoomEntry::from_node(node, default_capacity))
                .collect(),
        }
    }
}

/// What the dispatcher knows of a device. Strings are lowercased.
#[derive(Debug, Clone, Copy)]
pub struct DeviceQuery<'a> {
    /// Hash of the device's user: the consistent-hash key.
    pub key: u64,
    pub net: Option<Net>,
    pub region: Option<&'a str>,
    pub isp: Option<&'a str>,
}

/// The rooms chosen for a device, as indices into the table's rooms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub rooms: Vec<usize>,
    /// True when the device's region had no room up and another region's
    /// rooms were offered.
    pub region_fallback: bool,
}

/// Up to `count` rooms for `device`:
/// 1. rooms serving its network in its region, those listing its ISP first;
/// 2. when none of those is up, rooms serving its network in any region.
///
/// The network is a hard requirement; no region and no ISP match everything.
pub fn select(
    table: &RoomTable,
    device: &DeviceQuery<'_>,
    balancer: &dyn Balancer,
    count: usize,
) -> Selection {
    let (home, elsewhere): (Vec<usize>, Vec<usize>) = table
        .rooms
        .iter()
        .enumerate()
        .filter(|(_, room)| room.serves_net(device.net))
        .map(|(index, _)| index)
        .partition(|index| table.rooms[*index].serves_region(device.region));
    let any_up = |indices: &[usize]| indices.iter().any(|index| table.rooms[*index].up);
    if any_up(&home) {
        let (isp, rest): (Vec<usize>, Vec<usize>) = home
            .into_iter()
            .partition(|index| table.rooms[*index].lists_isp(device.isp));
        let mut rooms = ordered(table, &isp, device.key, balancer, count);
        let wanted = count.saturating_sub(rooms.len());
        rooms.extend(ordered(table, &rest, device.key, balancer, wanted));
        return Selection {
            rooms,
            region_fallback: false,
        };
    }
    Selection {
        rooms: ordered(table, &elsewhere, device.key, balancer, count),
        region_fallback: true,
    }
}

/// The balancer's order of `indices` (into the table), as table indices.
fn ordered(
    table: &RoomTable,
    indices: &[usize],
    key: u64,
    balancer: &dyn Balancer,
    count: usize,
) -> Vec<usize> {
    if count == 0 || indices.is_empty() {
        return Vec::new();
    }
    let candidates: Vec<Candidate<'_>> = indices
        .iter()
        .map(|index| table.rooms[*index].candidate())
        .collect();
    balancer
        .order(key, &candidates, count)
        .into_iter()
        .map(|position| indices[position])
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use pushgrid_proto::cluster::ClusterState;

    use super::*;
    use crate::balancer::{BalancerKind, BalancerOptions, build};

    fn room(id: &str, labels: &[(&str, &str)], load: u64) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            role: Role::Room as i32,
            tcp_addr: format!("127.0.0.1:{}", 9000 + id.len()),
            labels: labels
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect::<HashMap<_, _>>(),
            load,
            ..Default::default()
        }
    }

    fn table(nodes: Vec<NodeInfo>) -> RoomTable {
        let view = ClusterView::from_state(ClusterState {
            version: 1,
            nodes,
            ..Default::default()
        });
        RoomTable::from_view(&view, 1_000)
    }

    fn ids(table: &RoomTable, selection: &Selection) -> Vec<String> {
        selection
            .rooms
            .iter()
            .map(|index| table.rooms[*index].id.clone())
            .collect()
    }

    fn device<'a>(
        net: Option<Net>,
        region: Option<&'a str>,
        isp: Option<&'a str>,
    ) -> DeviceQuery<'a> {
        DeviceQuery {
            key: 42,
            net,
            region,
            isp,
        }
    }

    #[test]
    fn a_device_gets_rooms_of_its_network_in_its_region() {
        let table = table(vec![
            room("eu-wifi", &[("region", "eu"), ("net", "wifi")], 0),
            room("eu-cell", &[("region", "eu"), ("net", "cellular")], 0),
            room("eu-both", &[("region", "EU"), ("net", "wifi, cellular")], 0),
            room("us-wifi", &[("region", "us"), ("net", "wifi")], 0),
        ]);
        let random = build(BalancerKind::Random, BalancerOptions::default());
        let chosen = select(
            &table,
            &device(Some(Net::Wifi), Some("eu"), None),
            &*random,
            3,
        );
        let mut chosen_ids = ids(&table, &chosen);
        chosen_ids.sort();
        assert_eq!(chosen_ids, ["eu-both", "eu-wifi"]);
        assert!(!chosen.region_fallback);
    }

    #[test]
    fn another_region_serves_when_the_home_region_has_no_room_up() {
        let table = table(vec![
            room("eu-full", &[("region", "eu"), ("capacity", "10")], 10),
            room("eu-draining", &[("region", "eu"), ("draining", "true")], 0),
            room("us-1", &[("region", "us")], 0),
        ]);
        let hash = build(BalancerKind::ConsistentHash, BalancerOptions::default());
        let chosen = select(&table, &device(None, Some("eu"), None), &*hash, 3);
        assert_eq!(ids(&table, &chosen), ["us-1"]);
        assert!(chosen.region_fallback);
    }

    #[test]
    fn rooms_listing_the_device_isp_come_first_then_the_region_fills_up() {
        let table = table(vec![
            room("eu-a", &[("region", "eu")], 0),
            room("eu-b", &[("region", "eu"), ("isp", "orange")], 0),
            room("eu-c", &[("region", "eu")], 0),
            room("us-1", &[("region", "us")], 0),
        ]);
        let hash = build(BalancerKind::ConsistentHash, BalancerOptions::default());
        let chosen = select(&table, &device(None, Some("eu"), Some("orange")), &*hash, 3);
        let chosen_ids = ids(&table, &chosen);
        assert_eq!(chosen_ids[0], "eu-b");
        assert_eq!(chosen_ids.len(), 3);
        assert!(!chosen_ids.contains(&"us-1".to_string()));
    }

    #[test]
    fn no_room_of_the_network_anywhere_selects_nothing() {
        let table = table(vec![room(
            "eu-wifi",
            &[("region", "eu"), ("net", "wifi")],
            0,
        )]);
        let random = build(BalancerKind::Random, BalancerOptions::default());
        let chosen = select(
            &table,
            &device(Some(Net::Cellular), Some("eu"), None),
            &*random,
            3,
        );
        assert!(chosen.rooms.is_empty());
    }

    #[test]
    fn weight_is_free_capacity() {
        let table = table(vec![
            room("a", &[("capacity", "100")], 40),
            room("b", &[], 10),
        ]);
        assert_eq!(table.rooms[0].weight, 60);
        assert_eq!(table.rooms[1].weight, 990, "default capacity 1,000");
        assert!(table.rooms.iter().all(|room| room.up));
    }
}
