//! Redis Cluster basics shared by `pgcache check`, the test harness and (later) the daemon
//! and the read helper: hash slots of keys, and the cluster's own view of its nodes.
//!
//! Nothing here connects; see `docs/cluster.md` for how pgcache is to run on a cluster.

/// Hash slots in a Redis Cluster.
pub const CLUSTER_SLOTS: u16 = 16384;

/// The hash slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM) of the key modulo
/// 16384, or of its hash tag only, the text between the first `{` and the next `}` when
/// that is not empty.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(hashed) % CLUSTER_SLOTS
}

/// A short hash tag that maps to `slot`: `{tag}` in a key puts the key in that slot. This is
/// how a per-slot checkpoint lives in the slot whose changes it covers (docs/cluster.md).
/// The tags are the shortest decimal numbers that land in each slot, found once.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(CLUSTER_SLOTS)];
        let mut left = tags.len();
        let mut n = 0u64;
        while left > 0 {
            let text = n.to_string();
            let tag = &mut tags[usize::from(crc16_xmodem(text.as_bytes()) % CLUSTER_SLOTS)];
            if tag.is_empty() {
                *tag = text;
                left -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot % CLUSTER_SLOTS)]
}

/// CRC16 (XMODEM: polynomial 0x1021, initial 0) of every byte value, built at compile
/// time: one table look-up a byte instead of eight shifts, since the cluster apply hashes
/// every key of every batch.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = (byte as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
};

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ byte)]
    })
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    /// `127.0.0.1:port`.
    pub addr: String,
    pub flags: Vec<String>,
    /// The master's id for a replica.
    pub master_id: Option<String>,
    pub connected: bool,
    /// Slot ranges served, inclusive (masters only; migrating markers are left out).
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Flagged `fail` or `fail?` (possibly failing) by the node that was asked.
    pub fn is_failing(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }

    /// The node's client port.
    pub fn port(&self) -> Option<u16> {
        self.addr.rsplit_once(':')?.1.parse().ok()
    }
}

/// Parses `CLUSTER NODES` (`id ip:port@bus[,hostname] flags master ping pong epoch link
/// slot...`).
pub fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let addr = fields[1].split(['@', ',']).next()?.to_string();
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(ClusterNode {
                id: fields[0].to_string(),
                addr,
                flags: fields[2].split(',').map(str::to_string).collect(),
                master_id: (fields[3] != "-").then(|| fields[3].to_string()),
                connected: fields[7] == "connected",
                slots,
            })
        })
        .collect()
}

/// The slot ranges (inclusive) that no master in `nodes` serves, in order.
pub fn unserved_slots(nodes: &[ClusterNode]) -> Vec<(u16, u16)> {
    let mut served = vec![false; usize::from(CLUSTER_SLOTS)];
    for node in nodes.iter().filter(|n| n.is_master()) {
        for &(first, last) in &node.slots {
            for slot in first..=last.min(CLUSTER_SLOTS - 1) {
                served[usize::from(slot)] = true;
            }
        }
    }
    ranges(
        served
            .iter()
            .enumerate()
            .filter(|(_, &s)| !s)
            .map(|(i, _)| i as u16),
    )
}

/// Consecutive slots merged into inclusive ranges.
pub fn ranges(slots: impl IntoIterator<Item = u16>) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for slot in slots {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == slot => *last = slot,
            _ => out.push((slot, slot)),
        }
    }
    out
}

/// `0-5460, 16000` style text of slot ranges.
pub fn ranges_text(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"user:{42}:profile"), key_slot(b"42"));
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(
            key_slot(b"foo{}{bar}"),
            crc16_xmodem(b"foo{}{bar}") % CLUSTER_SLOTS
        );
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn the_crc_table_computes_what_the_bitwise_crc_does() {
        fn bitwise(bytes: &[u8]) -> u16 {
            let mut crc: u16 = 0;
            for &byte in bytes {
                crc ^= u16::from(byte) << 8;
                for _ in 0..8 {
                    crc = if crc & 0x8000 != 0 {
                        (crc << 1) ^ 0x1021
                    } else {
                        crc << 1
                    };
                }
            }
            crc
        }
        // The XMODEM check value.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
        let mut bytes = Vec::new();
        let mut x: u32 = 7;
        for _ in 0..2_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            bytes.push((x >> 16) as u8);
            assert_eq!(crc16_xmodem(&bytes), bitwise(&bytes), "{bytes:?}");
        }
    }

    #[test]
    fn every_slot_has_a_short_tag_that_maps_to_it() {
        for slot in 0..CLUSTER_SLOTS {
            let tag = slot_tag(slot);
            assert!(!tag.is_empty() && tag.len() <= 6, "{slot}: {tag:?}");
            assert_eq!(
                key_slot(format!("pgcache:{{{tag}}}:checkpoint").as_bytes()),
                slot
            );
        }
    }

    #[test]
    fn unserved_slots_are_ranges() {
        let nodes = parse_cluster_nodes(
            "a 127.0.0.1:1@2 master - 0 0 1 connected 0-99 200-16383\n\
             b 127.0.0.1:3@4 slave a 0 0 1 connected\n",
        );
        assert_eq!(unserved_slots(&nodes), vec![(100, 199)]);
        assert_eq!(ranges_text(&[(100, 199), (300, 300)]), "100-199, 300");
        assert!(unserved_slots(&parse_cluster_nodes(
            "a 127.0.0.1:1@2 master - 0 0 1 connected 0-16383\n"
        ))
        .is_empty());
    }

    #[test]
    fn cluster_nodes_lines_parse() {
        let text = "\
07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002,host.example master - 0 1426238316232 2 connected 5461-10922 [10923->-e7d1]
e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 16000
";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert!(!nodes[0].is_master());
        assert_eq!(nodes[0].master_id.as_deref(), Some("e7d1"));
        assert_eq!(nodes[1].addr, "127.0.0.1:30002");
        assert_eq!(nodes[1].slots, vec![(5461, 10922)]);
        assert_eq!(nodes[2].slots, vec![(0, 5460), (16000, 16000)]);
        assert_eq!(nodes[2].port(), Some(30001));
        assert!(nodes[2].is_master() && nodes[2].connected);
    }
}
