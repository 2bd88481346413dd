//! The demo's traffic: a shop writing to Postgres only, and readers going through
//! [`Reader`] (cache-aside with leases), with most reads on a few hot products.
//!
//! Writes are paced at a rate in transactions per second. Each kind of write is one
//! statement, so one transaction: an order placed takes stock from its products and inserts
//! the order in the same transaction, which the daemon applies to Redis in one `EXEC`.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::shop::{self, CUSTOMERS, ORDERS, PRODUCTS};
use crate::Reader;

/// Readers running concurrently; together they read `READS_PER_WRITE` times the write rate.
const READERS: u32 = 4;
const READS_PER_WRITE: u32 = 4;
/// Reads of orders go to the most recent ones, like order pages people refresh.
const RECENT_ORDERS: i32 = 50;

/// Counts of what the workload did, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Committed write transactions that changed at least one row.
    pub transactions: u64,
    /// Rows those transactions inserted, updated or deleted (all in cached tables).
    pub rows: u64,
    pub write_errors: u64,
    /// Lookups through the reader that returned (hit, filled or read from Postgres).
    pub reads: u64,
    pub read_errors: u64,
}

#[derive(Default)]
struct Shared {
    transactions: AtomicU64,
    rows: AtomicU64,
    write_errors: AtomicU64,
    reads: AtomicU64,
    read_errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Highest ids known to exist, for picking rows to touch and read.
    max_product: AtomicI32,
    max_customer: AtomicI32,
    max_order: AtomicI32,
}

impl Shared {
    fn failed(&self, counter: &AtomicU64, what: &str, error: impl std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(format!("{what}: {error}"));
        }
    }
}

/// The running workload.
pub struct Workload {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Starts one writer on `client` at `rate` transactions per second and the readers.
    /// `seed_rows` counts the rows already written by the seed, so totals compare with the
    /// daemon's.
    pub fn start(
        client: tokio_postgres::Client,
        reader: Reader,
        rate: u32,
        seed_rows: u64,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        shared.rows.store(seed_rows, Ordering::Relaxed);
        shared
            .max_product
            .store(shop::SEED_PRODUCTS, Ordering::Relaxed);
        shared
            .max_customer
            .store(shop::SEED_CUSTOMERS, Ordering::Relaxed);
        let (stop, stopped) = watch::channel(false);
        let rate = rate.max(1);
        let mut tasks = vec![tokio::spawn(write_loop(
            client,
            shared.clone(),
            rate,
            stopped.clone(),
        ))];
        let reads_per_reader = f64::from(rate * READS_PER_WRITE) / f64::from(READERS);
        for _ in 0..READERS {
            tasks.push(tokio::spawn(read_loop(
                reader.clone(),
                shared.clone(),
                reads_per_reader,
                stopped.clone(),
            )));
        }
        Workload {
            shared,
            stop,
            tasks,
        }
    }

    pub fn counts(&self) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            transactions: get(&self.shared.transactions),
            rows: get(&self.shared.rows),
            write_errors: get(&self.shared.write_errors),
            reads: get(&self.shared.reads),
            read_errors: get(&self.shared.read_errors),
        }
    }

    /// Stops writing and reading (a write in flight finishes first) and returns the final
    /// counts with the last error, if there was one.
    pub async fn stop(mut self) -> (Counts, Option<String>) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        let last_error = self.shared.last_error.lock().ok().and_then(|e| e.clone());
        (self.counts(), last_error)
    }
}

/// Paces a loop at `per_second` iterations: `None` once `stopped` turns true.
struct Pace {
    tick: tokio::time::Interval,
    stopped: watch::Receiver<bool>,
}

impl Pace {
    fn new(per_second: f64, stopped: watch::Receiver<bool>) -> Pace {
        let period = Duration::from_secs_f64(1.0 / per_second.max(0.1));
        let mut tick = tokio::time::interval(period);
        // Behind schedule, do not burst to catch up: the view shows the rate achieved.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Pace { tick, stopped }
    }

    async fn next(&mut self) -> Option<()> {
        if *self.stopped.borrow() {
            return None;
        }
        tokio::select! {
            _ = self.stopped.wait_for(|stop| *stop) => None,
            _ = self.tick.tick() => Some(()),
        }
    }
}

/// Kinds of writes, with their share of the traffic in percent.
#[derive(Debug, Clone, Copy)]
enum Write {
    PlaceOrder,
    AdvanceOrder,
    ChangePrice,
    Restock,
    SignUp,
    DeleteDeliveredOrder,
    ReplaceProduct,
}

const MIX: [(Write, u32); 7] = [
    (Write::PlaceOrder, 40),
    (Write::AdvanceOrder, 20),
    (Write::ChangePrice, 12),
    (Write::Restock, 12),
    (Write::SignUp, 8),
    (Write::DeleteDeliveredOrder, 6),
    (Write::ReplaceProduct, 2),
];

fn pick_write(rng: &mut StdRng) -> Write {
    let total: u32 = MIX.iter().map(|(_, share)| share).sum();
    let mut roll = rng.gen_range(0..total);
    for (write, share) in MIX {
        if roll < share {
            return write;
        }
        roll -= share;
    }
    Write::PlaceOrder
}

/// A product id: half the time a hot one.
fn pick_product(rng: &mut StdRng, shared: &Shared) -> i32 {
    let max = shared.max_product.load(Ordering::Relaxed).max(1);
    if rng.gen_bool(0.5) {
        rng.gen_range(1..=shop::HOT_PRODUCTS.min(max))
    } else {
        rng.gen_range(1..=max)
    }
}

const PLACE_ORDER: &str = "
WITH items AS (SELECT * FROM unnest($2::int[], $3::int[]) AS i (product_id, qty)),
     taken AS (UPDATE products p SET stock = p.stock - i.qty, updated_at = now()
               FROM items i WHERE p.id = i.product_id AND p.stock >= i.qty
               RETURNING p.price * i.qty AS amount)
INSERT INTO orders (customer_id, total, status)
SELECT $1, sum(amount), 'placed' FROM taken HAVING count(*) > 0
RETURNING id, (SELECT count(*) FROM taken)";

const ADVANCE_ORDER: &str = "
UPDATE orders SET status = CASE status WHEN 'placed' THEN 'shipped' ELSE 'delivered' END
WHERE id = $1 AND status <> 'delivered'";

const CHANGE_PRICE: &str = "
UPDATE products SET price = round(price * (0.9 + random() * 0.2)::numeric, 2), updated_at = now()
WHERE id = $1";

const RESTOCK: &str = "UPDATE products SET stock = stock + $2, updated_at = now() WHERE id = $1";

const SIGN_UP: &str = "INSERT INTO customers (email, name) VALUES ($1, $2) RETURNING id";

const DELETE_DELIVERED_ORDER: &str =
    "DELETE FROM orders WHERE id = (SELECT min(id) FROM orders WHERE status = 'delivered')";

const REPLACE_PRODUCT: &str = "
WITH gone AS (DELETE FROM products WHERE id = $1 RETURNING name)
INSERT INTO products (name, price, stock)
SELECT $2, round((2 + random() * 48)::numeric, 2), 200 FROM gone
RETURNING id";

const NAMES: [&str; 8] = [
    "Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Edsger", "Radia",
];

async fn write_loop(
    client: tokio_postgres::Client,
    shared: Arc<Shared>,
    rate: u32,
    stopped: watch::Receiver<bool>,
) {
    let mut rng = StdRng::from_entropy();
    let mut pace = Pace::new(f64::from(rate), stopped);
    while pace.next().await.is_some() {
        let write = pick_write(&mut rng);
        match one_write(&client, &shared, &mut rng, write).await {
            Ok(0) => {}
            Ok(rows) => {
                shared.transactions.fetch_add(1, Ordering::Relaxed);
                shared.rows.fetch_add(rows, Ordering::Relaxed);
            }
            Err(e) => shared.failed(&shared.write_errors, &format!("{write:?}"), e),
        }
    }
}

/// Runs one write; returns the rows it changed.
async fn one_write(
    client: &tokio_postgres::Client,
    shared: &Shared,
    rng: &mut StdRng,
    write: Write,
) -> Result<u64, tokio_postgres::Error> {
    match write {
        Write::PlaceOrder => {
            let customer = rng.gen_range(1..=shared.max_customer.load(Ordering::Relaxed).max(1));
            let mut products: Vec<i32> = (0..rng.gen_range(1..=3))
                .map(|_| pick_product(rng, shared))
                .collect();
            products.sort_unstable();
            products.dedup();
            let quantities: Vec<i32> = products.iter().map(|_| rng.gen_range(1..=3)).collect();
            let row = client
                .query_opt(PLACE_ORDER, &[&customer, &products, &quantities])
                .await?;
            Ok(match row {
                Some(row) => {
                    let id: i32 = row.try_get(0)?;
                    let taken: i64 = row.try_get(1)?;
                    shared.max_order.fetch_max(id, Ordering::Relaxed);
                    1 + taken.max(0) as u64
                }
                None => 0,
            })
        }
        Write::AdvanceOrder => {
            let max = shared.max_order.load(Ordering::Relaxed);
            if max == 0 {
                return Ok(0);
            }
            let id = rng.gen_range((max - 2 * RECENT_ORDERS).max(1)..=max);
            client.execute(ADVANCE_ORDER, &[&id]).await
        }
        Write::ChangePrice => {
            let id = pick_product(rng, shared);
            client.execute(CHANGE_PRICE, &[&id]).await
        }
        Write::Restock => {
            let id = pick_product(rng, shared);
            let amount: i32 = rng.gen_range(5..=50);
            client.execute(RESTOCK, &[&id, &amount]).await
        }
        Write::SignUp => {
            let email = format!("shopper-{:012x}@example.com", rng.gen::<u64>() >> 16);
            let name = NAMES[rng.gen_range(0..NAMES.len())];
            let row = client.query_one(SIGN_UP, &[&email, &name]).await?;
            let id: i32 = row.try_get(0)?;
            shared.max_customer.fetch_max(id, Ordering::Relaxed);
            Ok(1)
        }
        Write::DeleteDeliveredOrder => client.execute(DELETE_DELIVERED_ORDER, &[]).await,
        Write::ReplaceProduct => {
            // Never a hot product, so the hot keys stay hot.
            let max = shared.max_product.load(Ordering::Relaxed);
            if max <= shop::HOT_PRODUCTS {
                return Ok(0);
            }
            let id = rng.gen_range(shop::HOT_PRODUCTS + 1..=max);
            let name = format!("Seasonal special #{}", rng.gen_range(1000..10_000));
            match client.query_opt(REPLACE_PRODUCT, &[&id, &name]).await? {
                Some(row) => {
                    let new_id: i32 = row.try_get(0)?;
                    shared.max_product.fetch_max(new_id, Ordering::Relaxed);
                    Ok(2)
                }
                None => Ok(0),
            }
        }
    }
}

async fn read_loop(
    reader: Reader,
    shared: Arc<Shared>,
    per_second: f64,
    stopped: watch::Receiver<bool>,
) {
    let mut rng = StdRng::from_entropy();
    let mut pace = Pace::new(per_second, stopped);
    while pace.next().await.is_some() {
        let max_order = shared.max_order.load(Ordering::Relaxed);
        let roll = rng.gen_range(0..100);
        let (table, id) = if roll < 25 && max_order > 0 {
            let id = rng.gen_range((max_order - RECENT_ORDERS + 1).max(1)..=max_order);
            (ORDERS.table, id)
        } else if roll < 40 {
            let max = shared.max_customer.load(Ordering::Relaxed).max(1);
            (CUSTOMERS.table, rng.gen_range(1..=max))
        } else {
            // Mostly the hot products: the keys a front page shows.
            let id = if rng.gen_bool(0.8) {
                rng.gen_range(1..=shop::HOT_PRODUCTS)
            } else {
                pick_product(&mut rng, &shared)
            };
            (PRODUCTS.table, id)
        };
        match reader.get_raw(table, id).await {
            Ok(_) => {
                shared.reads.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.failed(&shared.read_errors, &format!("reading {table} {id}"), e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_adds_up_and_every_write_is_picked() {
        assert_eq!(MIX.iter().map(|(_, s)| s).sum::<u32>(), 100);
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = [0u32; MIX.len()];
        for _ in 0..10_000 {
            seen[pick_write(&mut rng) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
        // Place order is about 40%.
        assert!((3_500..4_500).contains(&seen[0]), "{seen:?}");
    }

    #[test]
    fn products_picked_exist() {
        let shared = Shared::default();
        shared.max_product.store(3, Ordering::Relaxed);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1_000 {
            assert!((1..=3).contains(&pick_product(&mut rng, &shared)));
        }
    }
}
