#!/usr/bin/env bash
# Measures what the read helper costs an application to build, against the same cache-aside
# written by hand with redis-rs and tokio-postgres: crates compiled, clean release build
# time, binary size. Both apps are built one after the other from clean target directories,
# with pgcache's own Cargo.lock as the starting point so both use the same crate versions.
# Build time is given twice: wall clock, and CPU time (user + system, of cargo and every
# compiler it runs), which other work on a shared machine disturbs far less.
#
#   bash benches/light-build.sh            # prints a table; JSON with --json FILE
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
json_out=""
[[ "${1:-}" == "--json" ]] && json_out=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/reader/src" "$work/byhand/src"
cat > "$work/reader/Cargo.toml" <<TOML
[package]
name = "reader-app"
version = "0.1.0"
edition = "2021"
[dependencies]
pgcache = { path = "$repo", default-features = false }
tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
serde = { version = "1", features = ["derive"] }
[workspace]
TOML
cat > "$work/reader/src/main.rs" <<'RS'
#[derive(serde::Deserialize, Debug)]
struct User { id: i64, email: String }

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reader = pgcache::Reader::builder("postgres://app@localhost/app", "redis://localhost:6379")
        .table("public.users", "user:{id}")
        .build()?;
    let user: Option<User> = reader.get("public.users", 42).await?;
    println!("{user:?}");
    Ok(())
}
RS
cat > "$work/byhand/Cargo.toml" <<TOML
[package]
name = "byhand-app"
version = "0.1.0"
edition = "2021"
[dependencies]
redis = { version = "1", features = ["tokio-comp", "connection-manager"] }
tokio-postgres = "0.7"
tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
serde = { version = "1", features = ["derive"] }
serde_json = "1"
[workspace]
TOML
cat > "$work/byhand/src/main.rs" <<'RS'
use redis::AsyncCommands;

#[derive(serde::Deserialize, Debug)]
struct User { id: i64, email: String }

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut redis = redis::Client::open("redis://localhost:6379")?.get_connection_manager().await?;
    let (pg, conn) = tokio_postgres::connect("postgres://app@localhost/app", tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let cached: Option<String> = redis.get("user:42").await?;
    let text = match cached {
        Some(text) => text,
        None => {
            let row = pg.query_one("SELECT row_to_json(u)::text FROM users u WHERE id = $1", &[&42i64]).await?;
            let text: String = row.get(0);
            let _: () = redis.set_ex("user:42", &text, 300).await?;
            text
        }
    };
    let user: User = serde_json::from_str(&text)?;
    println!("{user:?}");
    Ok(())
}
RS

measure() {
    local app=$1
    cp "$repo/Cargo.lock" "$work/$app/Cargo.lock"
    (cd "$work/$app" && cargo fetch -q) >&2
    local start end
    start=$(date +%s.%N)
    # `times` in the subshell: user and system time of its children (cargo, rustc, cc).
    if ! (cd "$work/$app" && cargo build --release 2> "$work/$app.log" && times > "$work/$app.cpu"); then
        echo "building the $app app failed:" >&2
        tail -30 "$work/$app.log" >&2
        return 1
    fi
    end=$(date +%s.%N)
    local crates size secs cpu
    crates=$(grep -c '^ *Compiling ' "$work/$app.log" || true)
    size=$(stat -c %s "$work/$app/target/release/$app-app")
    secs=$(echo "$end - $start" | bc)
    # The second line of `times` is "XmY.YYYs XmZ.ZZZs" (children's user, system).
    cpu=$(sed -n 2p "$work/$app.cpu" | tr 'ms' '  ' | awk '{print $1*60 + $2 + $3*60 + $4}')
    echo "$app $crates $secs $size $cpu"
}

echo "building both apps from clean (release); this takes a few minutes" >&2
read -r _ r_crates r_secs r_size r_cpu < <(measure reader)
read -r _ h_crates h_secs h_size h_cpu < <(measure byhand)
ratio() { echo "scale=2; $1 / $2" | bc; }
printf '%-28s %12s %12s %8s\n' "" "pgcache reader" "by hand" "ratio"
printf '%-28s %12s %12s %8s\n' "crates compiled" "$r_crates" "$h_crates" "$(ratio "$r_crates" "$h_crates")"
printf '%-28s %12.1f %12.1f %8s\n' "clean release build (s)" "$r_secs" "$h_secs" "$(ratio "$r_secs" "$h_secs")"
printf '%-28s %12.1f %12.1f %8s\n' "  CPU time (s)" "$r_cpu" "$h_cpu" "$(ratio "$r_cpu" "$h_cpu")"
printf '%-28s %12.1f %12.1f %8s\n' "binary (MB)" "$(echo "$r_size/1000000" | bc -l)" "$(echo "$h_size/1000000" | bc -l)" "$(ratio "$r_size" "$h_size")"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"
if [[ -n "$json_out" ]]; then
    cat > "$json_out" <<JSON
{"reader": {"crates": $r_crates, "build_seconds": $r_secs, "build_cpu_seconds": $r_cpu, "binary_bytes": $r_size},
 "by_hand": {"crates": $h_crates, "build_seconds": $h_secs, "build_cpu_seconds": $h_cpu, "binary_bytes": $h_size}}
JSON
fi
