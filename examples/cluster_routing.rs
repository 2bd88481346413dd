//! What routing a batch by hash slot costs (docs/cluster.md, "Measured cost"): the same
//! stream of row writes applied
//!
//! - `single`: to one Redis, as the daemon does today: per batch one pipeline of
//!   `WATCH checkpoint`, `EVAL check`, `MULTI`, the writes, `HSET checkpoint`, `EXEC`;
//! - `slot-multi`: to a 3-master cluster, the same guarded transaction once per hash slot the
//!   batch touches, against that slot's own checkpoint (co-located by `cluster::slot_tag`),
//!   pipelined per master, the masters written concurrently;
//! - `slot-script`: the same per-slot atomicity as one `EVAL` per slot (check, writes,
//!   checkpoint in one script), pipelined per master;
//! - `node-script`: one `EVAL` per master per batch (Redis 7 runs a script without a
//!   shebang across the slots of its node): it first checks every touched slot's checkpoint
//!   and that every key is served here (`pcall EXISTS`), writes nothing if any check fails,
//!   then writes the keys and each slot's checkpoint, so the whole batch's part on that
//!   master is atomic;
//! - `slot-plain`: the floor: one `MSET` per slot and nothing else, no checkpoint at all.
//!
//! Every variant also deletes each written key's lease, as the daemon does.
//!
//! Run: `cargo run --release --example cluster_routing -- [changes] [batch] [distinct keys]
//! [tenants]` (defaults 200000, 1000, 1000000, 0; with tenants, keys carry a hash tag
//! `tenant:{t}:item:i`, so a batch touches at most that many slots). It starts its own servers from the local
//! `redis-server` and removes them at the end.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgcache::cluster::{key_slot, slot_tag};
use pgcache::template::lease_key;
use pgcache::testkit::{RedisOptions, TestRedis, TestRedisCluster};
use rand::Rng;
use redis::aio::MultiplexedConnection;

const CHECK: &str = "local found = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'lsn') \
    if found[1] ~= ARGV[2] or found[2] ~= ARGV[1] or (found[3] or '-') ~= ARGV[3] then \
    redis.call('HINCRBY', KEYS[1], 'refused', 1) return {'refused'} end return {'ok'}";

/// Check, writes (ARGV[5..]: key, value, ...), checkpoint, in one script. Keys are declared
/// (KEYS[2..]) so the cluster checks their slot before anything runs.
const SLOT_SCRIPT: &str = "local found = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'lsn') \
    if found[1] ~= ARGV[2] or found[2] ~= ARGV[1] or (found[3] or '-') ~= ARGV[3] then \
    return 0 end \
    local n = (#KEYS - 1) / 2 \
    for i = 2, n + 1 do redis.call('SET', KEYS[i], ARGV[i + 3]) redis.call('DEL', KEYS[i + n]) end \
    redis.call('HSET', KEYS[1], 'lsn', ARGV[4]) return 1";

/// ARGV: owner, epoch, position, then per slot: checkpoint key, expected position, number of
/// keys, and that many (key, lease key, value) triples. KEYS[1] is the first slot's checkpoint (it routes
/// the script to its master).
const NODE_SCRIPT: &str = "
local owner, epoch, position = ARGV[1], ARGV[2], ARGV[3]
local i = 4
while i <= #ARGV do
  local found = redis.call('HMGET', ARGV[i], 'epoch', 'owner', 'lsn')
  if found[1] ~= epoch or found[2] ~= owner or (found[3] or '-') ~= ARGV[i + 1] then
    return {0, ARGV[i]}
  end
  local n = tonumber(ARGV[i + 2])
  for j = 0, n - 1 do
    local at = i + 3 + 3 * j
    for _, key in ipairs({ARGV[at], ARGV[at + 1]}) do
      local r = redis.pcall('EXISTS', key)
      if type(r) == 'table' and r.err then return {0, r.err} end
    end
  end
  i = i + 3 + 3 * n
end
i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i + 2])
  for j = 0, n - 1 do
    local at = i + 3 + 3 * j
    redis.call('SET', ARGV[at], ARGV[at + 2])
    redis.call('DEL', ARGV[at + 1])
  end
  redis.call('HSET', ARGV[i], 'lsn', position)
  i = i + 3 + 3 * n
end
return {1}";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Single,
    SlotMulti,
    SlotScript,
    NodeScript,
    SlotPlain,
}

/// One batch's writes for one slot: (key, value).
type Group = Vec<(String, Vec<u8>)>;

struct Target {
    /// One connection per master, and the slot ranges it serves.
    masters: Vec<(MultiplexedConnection, Vec<(u16, u16)>)>,
}

impl Target {
    fn master_of(&self, slot: u16) -> usize {
        self.masters
            .iter()
            .position(|(_, ranges)| ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .expect("every slot is served")
    }
}

fn checkpoint_key(slot: Option<u16>) -> String {
    match slot {
        Some(slot) => format!("pgcache:{{{}}}:checkpoint:{slot}", slot_tag(slot)),
        None => "pgcache:{pgcache}:checkpoint".to_string(),
    }
}

/// Sets every checkpoint's epoch and owner as a takeover would.
async fn take_over(target: &mut Target, variant: Variant) -> Result<()> {
    let slots: Vec<Option<u16>> = match variant {
        Variant::Single => vec![None],
        _ => (0..pgcache::cluster::CLUSTER_SLOTS).map(Some).collect(),
    };
    for slot in slots {
        let master = slot.map_or(0, |s| target.master_of(s));
        let key = checkpoint_key(slot);
        let conn = &mut target.masters[master].0;
        redis::cmd("HSET")
            .arg(&key)
            .arg("epoch")
            .arg("e")
            .arg("owner")
            .arg("o")
            .arg("lsn")
            .arg("0")
            .query_async::<()>(conn)
            .await?;
    }
    Ok(())
}

/// Applies `batches` and returns the time it took.
async fn apply(target: &mut Target, variant: Variant, batches: &[Group]) -> Result<Duration> {
    let started = Instant::now();
    let mut position = 0u64;
    // The position each checkpoint holds, as the daemon would remember it.
    let mut held: BTreeMap<Option<u16>, u64> = BTreeMap::new();
    for batch in batches {
        position += 1;
        if variant == Variant::Single {
            let ck = checkpoint_key(None);
            let mut pipe = redis::pipe();
            pipe.cmd("WATCH").arg(&ck).ignore();
            pipe.cmd("EVAL")
                .arg(CHECK)
                .arg(1)
                .arg(&ck)
                .arg("o")
                .arg("e")
                .arg(held.get(&None).copied().unwrap_or(0).to_string());
            pipe.cmd("MULTI").ignore();
            let mut mset = pipe.cmd("MSET");
            for (key, value) in batch {
                mset = mset.arg(key).arg(value);
            }
            mset.ignore();
            let mut del = pipe.cmd("DEL");
            for (key, _) in batch {
                del = del.arg(lease_key(key));
            }
            del.ignore();
            pipe.cmd("HSET").arg(&ck).arg("lsn").arg(position).ignore();
            pipe.cmd("EXEC").ignore();
            let conn = &mut target.masters[0].0;
            let (check,): (Vec<String>,) = pipe.query_async(conn).await?;
            anyhow::ensure!(check[0] == "ok", "refused: {check:?}");
            held.insert(None, position);
            continue;
        }
        let mut by_slot: BTreeMap<u16, Group> = BTreeMap::new();
        for (key, value) in batch {
            by_slot
                .entry(key_slot(key.as_bytes()))
                .or_default()
                .push((key.clone(), value.clone()));
        }
        let mut pipes: Vec<redis::Pipeline> =
            (0..target.masters.len()).map(|_| redis::pipe()).collect();
        let mut expected = vec![0usize; target.masters.len()];
        let mut node_args: Vec<Vec<Vec<u8>>> = vec![Vec::new(); target.masters.len()];
        let mut first_ck: Vec<Option<String>> = vec![None; target.masters.len()];
        for (slot, group) in &by_slot {
            let master = target.master_of(*slot);
            let pipe = &mut pipes[master];
            let ck = checkpoint_key(Some(*slot));
            let was = held.get(&Some(*slot)).copied().unwrap_or(0).to_string();
            match variant {
                Variant::SlotMulti => {
                    pipe.cmd("WATCH").arg(&ck).ignore();
                    pipe.cmd("EVAL")
                        .arg(CHECK)
                        .arg(1)
                        .arg(&ck)
                        .arg("o")
                        .arg("e")
                        .arg(&was)
                        .ignore();
                    pipe.cmd("MULTI").ignore();
                    let mut mset = pipe.cmd("MSET");
                    for (key, value) in group {
                        mset = mset.arg(key).arg(value);
                    }
                    mset.ignore();
                    let mut del = pipe.cmd("DEL");
                    for (key, _) in group {
                        del = del.arg(lease_key(key));
                    }
                    del.ignore();
                    pipe.cmd("HSET").arg(&ck).arg("lsn").arg(position).ignore();
                    pipe.cmd("EXEC");
                }
                Variant::SlotScript => {
                    let cmd = pipe
                        .cmd("EVAL")
                        .arg(SLOT_SCRIPT)
                        .arg(1 + 2 * group.len())
                        .arg(&ck);
                    for (key, _) in group {
                        cmd.arg(key);
                    }
                    for (key, _) in group {
                        cmd.arg(lease_key(key));
                    }
                    cmd.arg("o").arg("e").arg(&was).arg(position);
                    for (_, value) in group {
                        cmd.arg(value);
                    }
                }
                Variant::NodeScript => {
                    node_args[master].push(ck.into_bytes());
                    node_args[master].push(was.into_bytes());
                    node_args[master].push(group.len().to_string().into_bytes());
                    for (key, value) in group {
                        node_args[master].push(key.clone().into_bytes());
                        node_args[master].push(lease_key(key).into_bytes());
                        node_args[master].push(value.clone());
                    }
                    first_ck[master].get_or_insert_with(|| checkpoint_key(Some(*slot)));
                    continue;
                }
                Variant::SlotPlain => {
                    let mut mset = pipe.cmd("MSET");
                    for (key, value) in group {
                        mset = mset.arg(key).arg(value);
                    }
                }
                Variant::Single => unreachable!(),
            }
            expected[master] += 1;
        }
        if variant == Variant::NodeScript {
            for (master, args) in node_args.into_iter().enumerate() {
                let Some(ck) = first_ck[master].take() else {
                    continue;
                };
                pipes[master]
                    .cmd("EVAL")
                    .arg(NODE_SCRIPT)
                    .arg(1)
                    .arg(ck)
                    .arg("o")
                    .arg("e")
                    .arg(position)
                    .arg(args);
            }
        }
        let sends = target
            .masters
            .iter_mut()
            .zip(pipes)
            .filter(|(_, pipe)| !pipe.is_empty())
            .map(|((conn, _), pipe)| async move {
                let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
                Ok::<_, redis::RedisError>(replies)
            });
        for replies in futures_util::future::try_join_all(sends).await? {
            for reply in replies {
                let ok = match variant {
                    Variant::SlotMulti => matches!(reply, redis::Value::Array(_)),
                    Variant::SlotScript => reply == redis::Value::Int(1),
                    Variant::NodeScript => node_accepted(&reply),
                    Variant::SlotPlain => reply == redis::Value::Okay,
                    Variant::Single => false,
                };
                anyhow::ensure!(ok, "{variant:?}: unexpected reply {reply:?}");
            }
        }
        for slot in by_slot.keys() {
            held.insert(Some(*slot), position);
        }
    }
    Ok(started.elapsed())
}

/// The node script's `{1}`.
fn node_accepted(reply: &redis::Value) -> bool {
    matches!(reply, redis::Value::Array(items) if items.first() == Some(&redis::Value::Int(1)))
}

async fn connect(url: &str) -> Result<MultiplexedConnection> {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let changes = args.next().transpose()?.unwrap_or(200_000);
    let batch = args.next().transpose()?.unwrap_or(1_000);
    let distinct = args.next().transpose()?.unwrap_or(1_000_000);
    // With tenants, keys are `tenant:{t}:item:i`: a batch touches at most that many slots.
    let tenants = args.next().transpose()?.unwrap_or(0);

    let mut rng = rand::thread_rng();
    let value = vec![b'x'; 100];
    let batches: Vec<Group> = (0..changes.div_ceil(batch))
        .map(|_| {
            (0..batch)
                .map(|_| {
                    let id = rng.gen_range(0..distinct);
                    let key = if tenants > 0 {
                        format!("tenant:{{{}}}:item:{id}", id % tenants)
                    } else {
                        format!("item:{id}")
                    };
                    (key, value.clone())
                })
                .collect()
        })
        .collect();
    let slots_per_batch: f64 = batches
        .iter()
        .map(|b| {
            let mut slots: Vec<u16> = b.iter().map(|(k, _)| key_slot(k.as_bytes())).collect();
            slots.sort_unstable();
            slots.dedup();
            slots.len() as f64
        })
        .sum::<f64>()
        / batches.len() as f64;
    println!(
        "{changes} changes of 100 bytes in batches of {batch}, over {distinct} keys: {slots_per_batch:.0} hash slots per batch"
    );

    let single = tokio::task::spawn_blocking(TestRedis::start).await??;
    let cluster =
        tokio::task::spawn_blocking(|| TestRedisCluster::start_with(3, 0, RedisOptions::default()))
            .await??;
    let mut single_target = Target {
        masters: vec![(connect(&single.url()).await?, vec![(0, 16383)])],
    };
    let mut masters = Vec::new();
    for node in cluster.topology()?.into_iter().filter(|n| n.is_master()) {
        let port = node.port().context("a master's port")?;
        masters.push((
            connect(&format!("redis://127.0.0.1:{port}/")).await?,
            node.slots,
        ));
    }
    let mut cluster_target = Target { masters };

    let mut base = None;
    for variant in [
        Variant::Single,
        Variant::SlotMulti,
        Variant::SlotScript,
        Variant::NodeScript,
        Variant::SlotPlain,
    ] {
        let target = if variant == Variant::Single {
            &mut single_target
        } else {
            &mut cluster_target
        };
        take_over(target, variant).await?;
        // A warm-up pass, then the measured one.
        apply(target, variant, &batches[..batches.len().min(5)]).await?;
        take_over(target, variant).await?;
        let took = apply(target, variant, &batches).await?;
        let rate = changes as f64 / took.as_secs_f64();
        let ratio = base.map_or(1.0, |b: f64| rate / b);
        base.get_or_insert(rate);
        println!(
            "{:<12} {:>10.0} changes/s  {:>6.2}x single  ({:.2}s)",
            format!("{variant:?}"),
            rate,
            ratio,
            took.as_secs_f64()
        );
    }
    Ok(())
}
