//! `pgcache demo`, the README's first command, run as a user runs it: the binary, for a few
//! seconds, without a terminal.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `pgcache` with `args` and a `PATH`, killing it if it runs past `limit`.
fn run_pgcache(args: &[&str], path: Option<&str>, limit: Duration) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcache"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    let mut child = cmd.spawn().expect("spawn pgcache");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "pgcache {args:?} ran longer than {limit:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// The value after `key=` in the line starting with `prefix`.
fn field<'a>(stdout: &'a str, prefix: &str, key: &str) -> &'a str {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{stdout}"));
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn demo_runs_converges_and_cleans_up() {
    demo_converges(&["demo", "--seconds", "4"]);
}

/// `pgcache demo --cluster`: the same on a local 3-master Redis Cluster.
#[test]
fn demo_on_a_cluster_runs_converges_and_cleans_up() {
    let stdout = demo_converges(&["demo", "--cluster", "--seconds", "4"]);
    assert!(
        stdout.contains("(a Redis Cluster of 3 masters on ports "),
        "{stdout}"
    );
}

/// Runs the demo with `args` and checks what every run shows; returns its output.
fn demo_converges(args: &[&str]) -> String {
    let started = Instant::now();
    let out = run_pgcache(args, None, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(
        out.status.success(),
        "demo failed: {:?}\n{context}",
        out.status
    );
    // About 6 s on an idle machine (4 s of traffic); no bound here beyond run_pgcache's,
    // because the machine running the tests may be busy.
    eprintln!("pgcache demo --seconds 4 took {:?}", started.elapsed());

    // The live view, one plain line per second (stdout is not a terminal here).
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert!(lines.len() >= 3, "expected a line per second\n{context}");
    assert!(
        !stdout.contains('\x1b'),
        "no ANSI codes without a terminal\n{context}"
    );
    assert!(lines.iter().all(|l| l.contains("hit rate")), "{context}");
    assert!(stdout.contains("keys per table: "), "{context}");
    assert!(
        stdout.contains("(= rows written)"),
        "every row written was applied\n{context}"
    );

    // The proof: Redis matched Postgres once the writes stopped.
    assert!(
        stdout.contains("converged: Redis matches Postgres"),
        "{context}"
    );
    for table in ["public.products", "public.customers"] {
        assert!(
            stdout.contains(&format!("{table}: ")) && stdout.contains("byte for byte"),
            "{table} not compared\n{context}"
        );
    }
    assert!(
        stdout.contains("each equal to its current row"),
        "{context}"
    );

    // The data really was in Redis.
    let count = |table: &str| -> u64 {
        field(&stdout, "redis keys:", table)
            .parse()
            .unwrap_or_else(|e| panic!("{table}: {e}\n{context}"))
    };
    assert!(count("product") >= 200, "{context}");
    assert!(count("customer") >= 100, "{context}");
    assert!(count("order") > 0, "the reader cached orders\n{context}");

    assert_nothing_left(&stdout, &context);
    stdout.into_owned()
}

#[test]
fn demo_says_what_to_install_when_redis_is_missing() {
    let empty = tempfile::tempdir().expect("tempdir");
    let path = empty.path().to_str().expect("utf-8 path");
    let out = run_pgcache(
        &["demo", "--seconds", "1"],
        Some(path),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("redis-server not found")
            && stderr.contains("apt-get install -y redis-server"),
        "{stderr}"
    );
    // Nothing was started.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("servers:"));
}

/// The servers the demo printed are gone, and so are their directories.
fn assert_nothing_left(stdout: &str, context: &str) {
    for server in ["postgres", "redis"] {
        let addr = field(stdout, "servers:", server);
        assert!(
            TcpStream::connect_timeout(&addr.parse().expect("address"), Duration::from_secs(1))
                .is_err(),
            "{server} at {addr} still accepts connections after the demo\n{context}"
        );
    }
    let dirs = stdout
        .lines()
        .find_map(|l| l.strip_prefix("temporary directories: "))
        .unwrap_or_else(|| panic!("no temporary directories line\n{context}"));
    for dir in dirs.split_whitespace() {
        assert!(!Path::new(dir).exists(), "{dir} was not removed\n{context}");
    }
    assert!(stdout.contains("cleaned up: "), "{context}");
}

#[test]
fn ctrl_c_ends_the_demo_with_a_summary_and_cleans_up() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgcache");
    let pid = child.id() as i32;
    // A watchdog, so a demo that ignores Ctrl-C fails the test instead of hanging it. It
    // stands down as soon as the child is reaped (the sender drops), so it never signals a
    // pid that was given to another process.
    let (reaped, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(Duration::from_secs(120))
            == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        {
            // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut stdout = String::new();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut interrupted = false;
    while lines.read_line(&mut line).expect("read stdout") > 0 {
        // The second line of the live view: the workload has run for two seconds.
        if !interrupted && line.starts_with("[") && stdout.contains("\n[") {
            // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped.
            unsafe { libc::kill(pid, libc::SIGINT) };
            interrupted = true;
        }
        stdout.push_str(&line);
        line.clear();
    }
    let status = child.wait().expect("wait");
    drop(reaped);
    let _ = watchdog.join();
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    let context = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(interrupted, "the live view never started\n{context}");
    assert!(status.success(), "{status:?}\n{context}");
    assert!(
        stdout.contains("converged: Redis matches Postgres"),
        "{context}"
    );
    assert!(
        field(&stdout, "redis keys:", "product")
            .parse::<u64>()
            .expect("count")
            >= 200
    );
    assert_nothing_left(&stdout, &context);
}
