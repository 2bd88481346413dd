//! A product cache for a catalog page, configured in code rather than from a file.
//!
//! One call fetches a page of products: one MGET, then the misses in one database query,
//! each filled under its lease. Unknown SKUs are cached as absent for 30 s, so a crawler
//! asking for made-up SKUs cannot hammer Postgres; a later insert ends that at once,
//! because the daemon revokes the key's lease (where the absence is kept) with every change.
//!
//! ```text
//! PG_URL=postgres://app@localhost/shop REDIS_URL=redis://localhost:6379 \
//!     cargo run --example product_cache -- sku-1 sku-2 sku-404
//! ```

use std::time::Duration;

use pgcache::reader::ReaderOptions;
use pgcache::Reader;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Product {
    sku: String,
    title: String,
    /// numeric arrives as a string, so no cent is lost to floating point.
    price: String,
    stock: i32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let var = |name: &str| std::env::var(name).map_err(|_| format!("set {name}"));
    let reader = Reader::builder(&var("PG_URL")?, &var("REDIS_URL")?)
        .table("shop.products", "product:{sku}")
        .options(ReaderOptions::default().negative_ttl(Some(Duration::from_secs(30))))
        .build()?;

    let skus: Vec<String> = std::env::args().skip(1).collect();
    let products: Vec<Option<Product>> = reader.get_many("shop.products", &skus).await?;
    for (sku, product) in skus.iter().zip(products) {
        match product {
            Some(p) => println!(
                "{:<12} {:<30} {:>10} ({} in stock)",
                p.sku, p.title, p.price, p.stock
            ),
            None => println!("{sku:<12} (no such product)"),
        }
    }
    let stats = reader.stats();
    println!(
        "hit rate {:.0}%, database reads {}",
        stats.hit_rate() * 100.0,
        stats.db_reads
    );
    Ok(())
}
