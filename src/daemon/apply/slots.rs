//! A batch's operations split by Redis Cluster hash slot, for the cluster apply
//! (`daemon::cluster_apply`; docs/cluster.md, "Applying a batch"): each slot's
//! operations are written in one guarded transaction with that slot's checkpoint.
//!
//! - Within a slot, operations keep their stream order; every operation on a row key also
//!   revokes the key's lease, which is in the same slot ([`crate::template::lease_key`]).
//! - An operation over a key space ([`Op::DropKeySpace`], [`Op::DropMatching`]) touches every
//!   slot, so it cuts the batch: the operations before it, it, then the operations after it
//!   ([`Segment`]), applied in that order.
//! - A merge whose base (the old key of a row whose key changed) is in another slot cannot
//!   read it in the same transaction. It becomes a merge with no base (its key is deleted),
//!   which for a mirror row records the repair in the slot's own checkpoint
//!   (`repair:<key>`) in the same transaction, as when a merge finds no base: the row is read
//!   again, even after a crash that comes before the read. Absence is safe.

use std::collections::BTreeMap;

use super::{ChangeTag, Op};
use crate::cluster::key_slot;

/// One stretch of the batch, in stream order.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// Operations on keys, by hash slot, each slot's in stream order.
    Slots(BTreeMap<u16, Vec<Op>>),
    /// An operation over a key space, on every slot (but those whose checkpoint covers the
    /// change it comes from, when it has a tag).
    Everywhere(Op, Option<ChangeTag>),
}

/// What [`split`] made of a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotSplit {
    pub segments: Vec<Segment>,
}

impl SlotSplit {
    /// How many slot transactions the batch takes (a key-space operation counts once).
    pub fn transactions(&self) -> usize {
        self.segments
            .iter()
            .map(|segment| match segment {
                Segment::Slots(slots) => slots.len(),
                Segment::Everywhere(..) => 1,
            })
            .sum()
    }
}

/// Splits `ops` by hash slot (see the module's doc).
pub fn split(ops: Vec<Op>) -> SlotSplit {
    let tags = vec![None; ops.len()];
    split_skipping(ops, tags, |_, _| false)
}

/// Splits `ops` (each with the change it comes from, `tags`) by hash slot, leaving out the
/// operations on keys of a slot that `covered` says already has their change (after a
/// restart, a slot whose own checkpoint is ahead of the stream's start).
pub fn split_skipping(
    ops: Vec<Op>,
    tags: Vec<Option<ChangeTag>>,
    covered: impl Fn(u16, ChangeTag) -> bool,
) -> SlotSplit {
    let mut out = SlotSplit::default();
    // The operations on keys since the last key-space operation, with their slots: grouped
    // by a stable sort when the stretch ends (cheaper than a map look-up per operation on a
    // batch that touches thousands of slots).
    let mut current: Vec<(u16, Op)> = Vec::new();
    let tags = tags.into_iter().chain(std::iter::repeat(None));
    for (op, tag) in ops.into_iter().zip(tags) {
        let slot = op.key().map(|key| key_slot(key.as_bytes()));
        if let (Some(slot), Some(tag)) = (slot, tag) {
            if covered(slot, tag) {
                continue;
            }
        }
        let op = match op {
            Op::Merge(mut merge) if Some(key_slot(merge.base.as_bytes())) != slot => {
                merge.base.clone_from(&merge.key);
                merge.stale_base = true;
                Op::Merge(merge)
            }
            other => other,
        };
        match slot {
            Some(slot) => current.push((slot, op)),
            None => {
                if !current.is_empty() {
                    out.segments.push(by_slot(std::mem::take(&mut current)));
                }
                out.segments.push(Segment::Everywhere(op, tag));
            }
        }
    }
    if !current.is_empty() {
        out.segments.push(by_slot(current));
    }
    out
}

/// Operations with their slots, grouped by slot, each slot's in the order given. The
/// operations themselves are moved once: the sort is over (slot, index) pairs.
fn by_slot(ops: Vec<(u16, Op)>) -> Segment {
    let mut order: Vec<(u16, u32)> = ops
        .iter()
        .enumerate()
        .map(|(i, (slot, _))| (*slot, i as u32))
        .collect();
    // Unstable is enough: the index breaks ties, so each slot keeps the order given.
    order.sort_unstable();
    let mut ops: Vec<Option<Op>> = ops.into_iter().map(|(_, op)| Some(op)).collect();
    let mut grouped: Vec<(u16, Vec<Op>)> = Vec::new();
    for (slot, i) in order {
        let op = ops[i as usize]
            .take()
            .expect("each operation is taken once");
        match grouped.last_mut() {
            Some((last, slot_ops)) if *last == slot => slot_ops.push(op),
            _ => grouped.push((slot, vec![op])),
        }
    }
    // Sorted by slot: the map is built in one pass.
    Segment::Slots(grouped.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;
    use crate::daemon::apply::{Merge, MergeValue, Repair};

    fn set(key: &str, value: &str) -> Op {
        Op::Set {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
            ttl_ms: None,
        }
    }

    fn merge(key: &str, base: &str, repair: bool) -> Op {
        Op::Merge(Box::new(Merge {
            key: key.to_string(),
            base: base.to_string(),
            format: Format::Json,
            columns: vec![(b"\"a\"".to_vec(), MergeValue::Unchanged)],
            ttl_ms: None,
            only_if_cached: !repair,
            repair: repair.then(|| Repair {
                table: "public.t".to_string(),
                key: key.to_string(),
                key_texts: vec!["2".to_string()],
            }),
            stale_base: false,
        }))
    }

    #[test]
    fn operations_group_by_slot_in_stream_order() {
        let ops = vec![
            set("t:1", "a"),
            set("tenant:{9}:x", "b"),
            Op::Del {
                key: "t:1".to_string(),
            },
            set("tenant:{9}:y", "c"),
            set("t:1", "d"),
        ];
        let split = split(ops);
        let [Segment::Slots(slots)] = split.segments.as_slice() else {
            panic!("{:?}", split.segments)
        };
        assert_eq!(slots.len(), 2);
        let keys = |slot: u16| -> Vec<Option<&str>> { slots[&slot].iter().map(Op::key).collect() };
        assert_eq!(keys(key_slot(b"t:1")), [Some("t:1"); 3]);
        assert_eq!(slots[&key_slot(b"t:1")][2], set("t:1", "d"));
        assert_eq!(
            keys(key_slot(b"9")),
            [Some("tenant:{9}:x"), Some("tenant:{9}:y")]
        );
        assert_eq!(split.transactions(), 2);
    }

    #[test]
    fn many_operations_keep_their_order_within_each_slot() {
        // 3,000 operations over 50 hash tags: each slot's operations come out in the order
        // they went in, and none is lost or doubled.
        let ops: Vec<Op> = (0..3_000)
            .map(|i| set(&format!("t:{{{}}}:{i}", i * 7 % 50), &i.to_string()))
            .collect();
        let split = split(ops);
        let [Segment::Slots(slots)] = split.segments.as_slice() else {
            panic!("{:?}", split.segments)
        };
        let mut seen = 0;
        for (slot, slot_ops) in slots {
            let order: Vec<usize> = slot_ops
                .iter()
                .map(|op| {
                    let key = op.key().unwrap();
                    assert_eq!(key_slot(key.as_bytes()), *slot, "{key}");
                    key.rsplit(':').next().unwrap().parse().unwrap()
                })
                .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{slot}: {order:?}");
            seen += order.len();
        }
        assert_eq!(seen, 3_000);
    }

    #[test]
    fn key_space_operations_cut_the_batch() {
        let drop = Op::DropKeySpace {
            key_space: "t:".to_string(),
        };
        let split = split(vec![set("t:1", "a"), drop.clone(), set("t:1", "b")]);
        assert_eq!(split.segments.len(), 3);
        assert_eq!(split.segments[1], Segment::Everywhere(drop, None));
        let Segment::Slots(after) = &split.segments[2] else {
            panic!("{:?}", split.segments)
        };
        assert_eq!(after[&key_slot(b"t:1")], [set("t:1", "b")]);
        assert_eq!(split.transactions(), 3);
    }

    #[test]
    fn merges_across_slots_lose_their_base() {
        // Same hash tag: one slot, the merge stays.
        let same = merge("tenant:{9}:2", "tenant:{9}:1", true);
        let split_same = split(vec![same.clone()]);
        assert_eq!(
            split_same.segments,
            [Segment::Slots(BTreeMap::from([(
                key_slot(b"9"),
                vec![same]
            )]))]
        );

        // t:1 and t:2 are in different slots: the merge has no base left (the script
        // deletes the key and, for the mirror row, records its repair in the slot).
        assert_ne!(key_slot(b"t:1"), key_slot(b"t:2"));
        assert_ne!(key_slot(b"r:1"), key_slot(b"r:2"));
        let split_apart = split(vec![merge("t:2", "t:1", true), merge("r:2", "r:1", false)]);
        let Segment::Slots(slots) = &split_apart.segments[0] else {
            panic!("{:?}", split_apart.segments)
        };
        let no_base = |key: &str, repair: bool| {
            let Op::Merge(mut m) = merge(key, key, repair) else {
                unreachable!()
            };
            m.stale_base = true;
            vec![Op::Merge(m)]
        };
        assert_eq!(slots[&key_slot(b"t:2")], no_base("t:2", true));
        assert_eq!(slots[&key_slot(b"r:2")], no_base("r:2", false));
        let Op::Merge(m) = &slots[&key_slot(b"t:2")][0] else {
            unreachable!()
        };
        assert_eq!(m.repair.as_ref().map(|r| r.key.as_str()), Some("t:2"));
    }
}
