//! Streamed transactions waiting for their end: one file per top-level xid.
//!
//! With `streaming 'on'` Postgres sends a large transaction in blocks while it runs, and
//! only later says whether it committed (Stream Commit) or rolled back (Stream Abort). The
//! blocks go to disk as they come, so the daemon's memory does not grow with the
//! transaction (G8); at Stream Commit the file is read back, one message at a time, through
//! the same path as a transaction sent whole ([`Replay`]). At Stream Abort it is deleted.
//!
//! Nothing here is durable on purpose: a file only matters until its transaction is applied,
//! and Postgres sends again, in full, every transaction whose commit it has not had
//! confirmed. So the directory is emptied when a session starts ([`Spool::open`]).
//!
//! A file is a sequence of records: a big-endian `u32` length, then one pgoutput payload
//! exactly as it came (changes inside a stream block carry their subtransaction's xid).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// The open streamed transactions of one session, and the block being received.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    pending: HashMap<u32, Pending>,
    /// The transaction whose block is being received (between Stream Start and Stop), and
    /// its file open for appending.
    block: Option<(u32, BufWriter<File>)>,
}

/// A streamed transaction with blocks on disk and no end yet.
#[derive(Debug)]
struct Pending {
    path: PathBuf,
    /// Payload bytes spooled (without the record lengths): decides whether it is applied
    /// atomically.
    bytes: u64,
    /// Subtransactions rolled back: their changes are skipped at replay. Postgres sends an
    /// abort for each one, nested ones included, so no parent links are needed.
    aborted: HashSet<u32>,
}

/// Why a streamed transaction cannot be spooled or read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    #[error("spool directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The server broke the stream's rules (a block for a transaction never started, a
    /// block inside a block): the session should start over, and Postgres send again.
    #[error("streamed transaction {xid}: {what}")]
    Protocol { xid: u32, what: &'static str },
}

/// Deletes the spool files an earlier session left in `dir`, for a session that does not
/// stream (`postgres.streaming = false`, or a server before 14): nothing else would. Best
/// effort: a directory that is missing or unreadable has nothing to free.
pub(super) fn remove_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|entry| entry.path()) {
        if path.extension().is_some_and(|e| e == "spool") {
            let _ = fs::remove_file(&path);
        }
    }
}

impl Spool {
    /// Creates `dir` if needed and deletes every spool file an earlier session left there.
    ///
    /// # Errors
    /// The directory cannot be created, read, or written (the error names it).
    pub(super) fn open(dir: &Path) -> Result<Spool, SpoolError> {
        let io = |source| SpoolError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        for entry in fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "spool") {
                fs::remove_file(&path).map_err(io)?;
            }
        }
        // Writable now, not at the first large transaction.
        let probe = dir.join("probe.spool");
        File::create(&probe).map_err(io)?;
        fs::remove_file(&probe).map_err(io)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            pending: HashMap::new(),
            block: None,
        })
    }

    /// Checks that `dir` can hold spool files, leaving what is there alone (for `pgcache
    /// check`, which may run beside a daemon using it).
    ///
    /// # Errors
    /// The directory cannot be created or written (the error names it).
    pub(crate) fn check_writable(dir: &Path) -> Result<(), SpoolError> {
        let io = |source| SpoolError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let probe = dir.join(format!("check-{}.probe", std::process::id()));
        File::create(&probe).map_err(io)?;
        fs::remove_file(&probe).map_err(io)
    }

    fn io(&self, source: io::Error) -> SpoolError {
        SpoolError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Whether a block is being received (messages are to be appended).
    pub(super) fn in_block(&self) -> bool {
        self.block.is_some()
    }

    /// How many streamed transactions have blocks and no end yet.
    #[cfg(test)]
    fn open_transactions(&self) -> usize {
        self.pending.len()
    }

    /// Stream Start: the next messages, up to Stream Stop, belong to `xid`.
    ///
    /// # Errors
    /// A block already open, a later block of a transaction whose first was not seen, or
    /// the file cannot be opened.
    pub(super) fn start(&mut self, xid: u32, first_segment: bool) -> Result<(), SpoolError> {
        if self.block.is_some() {
            return Err(SpoolError::Protocol {
                xid,
                what: "Stream Start inside another block",
            });
        }
        if first_segment {
            let path = self.dir.join(format!("{xid}.spool"));
            self.pending.insert(
                xid,
                Pending {
                    path,
                    bytes: 0,
                    aborted: HashSet::new(),
                },
            );
        }
        let Some(pending) = self.pending.get(&xid) else {
            return Err(SpoolError::Protocol {
                xid,
                what: "a later block without the first",
            });
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&pending.path);
        let file = file.map_err(|e| self.io(e))?;
        if first_segment {
            // A file left by an xid this session saw before (wraparound) starts empty.
            file.set_len(0).map_err(|e| self.io(e))?;
        }
        self.block = Some((xid, BufWriter::with_capacity(64 << 10, file)));
        Ok(())
    }

    /// Appends one message of the open block.
    ///
    /// # Errors
    /// No block open, a message over 4 GiB, or the write fails (disk full).
    pub(super) fn append(&mut self, payload: &[u8]) -> Result<(), SpoolError> {
        let Some((xid, file)) = &mut self.block else {
            return Err(SpoolError::Protocol {
                xid: 0,
                what: "a streamed change outside a block",
            });
        };
        let xid = *xid;
        let len = u32::try_from(payload.len()).map_err(|_| SpoolError::Protocol {
            xid,
            what: "a message over 4 GiB",
        })?;
        let written = file
            .write_all(&len.to_be_bytes())
            .and_then(|()| file.write_all(payload));
        written.map_err(|e| self.io(e))?;
        if let Some(pending) = self.pending.get_mut(&xid) {
            pending.bytes += u64::from(len);
        }
        Ok(())
    }

    /// Stream Stop: the block is complete; its file is flushed and closed.
    ///
    /// # Errors
    /// No block open, or the flush fails.
    pub(super) fn stop(&mut self) -> Result<(), SpoolError> {
        let Some((_, mut file)) = self.block.take() else {
            return Err(SpoolError::Protocol {
                xid: 0,
                what: "Stream Stop outside a block",
            });
        };
        file.flush().map_err(|e| self.io(e))
    }

    /// Stream Abort: the transaction's file goes (`subxid == xid`), or the subtransaction's
    /// changes are marked to be skipped.
    ///
    /// # Errors
    /// The file cannot be deleted.
    pub(super) fn abort(&mut self, xid: u32, subxid: u32) -> Result<(), SpoolError> {
        if xid == subxid {
            if let Some(pending) = self.pending.remove(&xid) {
                remove(&pending.path).map_err(|e| self.io(e))?;
            }
        } else if let Some(pending) = self.pending.get_mut(&xid) {
            pending.aborted.insert(subxid);
        }
        Ok(())
    }

    /// Stream Commit: the transaction's spooled messages, to apply.
    ///
    /// # Errors
    /// No blocks were spooled for it, or its file cannot be opened.
    pub(super) fn commit(&mut self, xid: u32) -> Result<Replay, SpoolError> {
        if self.block.is_some() {
            return Err(SpoolError::Protocol {
                xid,
                what: "Stream Commit inside a block",
            });
        }
        let Some(pending) = self.pending.remove(&xid) else {
            return Err(SpoolError::Protocol {
                xid,
                what: "Stream Commit without its blocks",
            });
        };
        let file = File::open(&pending.path).map_err(|e| self.io(e))?;
        Ok(Replay {
            dir: self.dir.clone(),
            path: pending.path,
            reader: BufReader::with_capacity(64 << 10, file),
            bytes: pending.bytes,
            aborted: pending.aborted,
        })
    }
}

/// A committed streamed transaction's messages, read back in order. The file is deleted
/// when the replay is dropped.
#[derive(Debug)]
pub(super) struct Replay {
    dir: PathBuf,
    path: PathBuf,
    reader: BufReader<File>,
    bytes: u64,
    aborted: HashSet<u32>,
}

impl Replay {
    /// The payload bytes spooled.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether changes carrying `xid` belong to a subtransaction that rolled back.
    pub(super) fn is_aborted(&self, xid: u32) -> bool {
        self.aborted.contains(&xid)
    }

    /// The next message, `None` at the end.
    ///
    /// # Errors
    /// The file cannot be read, or ends inside a record.
    pub(super) fn next_payload(&mut self) -> Result<Option<Bytes>, SpoolError> {
        let io = |source| SpoolError::Io {
            dir: self.dir.clone(),
            source,
        };
        let mut len = [0u8; 4];
        match self.reader.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io(e)),
        }
        let mut payload = vec![0; u32::from_be_bytes(len) as usize];
        self.reader.read_exact(&mut payload).map_err(io)?;
        Ok(Some(Bytes::from(payload)))
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot delete a spool file");
        }
    }
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn leftovers_are_removed_and_other_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("770.spool"), b"x").unwrap();
        fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        remove_leftovers(dir.path());
        assert!(!dir.path().join("770.spool").exists());
        assert!(dir.path().join("notes.txt").exists());
        remove_leftovers(&dir.path().join("missing"));
    }
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pgcache-spool-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn drain(replay: &mut Replay) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(p) = replay.next_payload().unwrap() {
            out.push(p);
        }
        out
    }

    #[test]
    fn blocks_of_interleaved_transactions_replay_in_order() {
        let dir = dir("interleaved");
        let mut spool = Spool::open(&dir).unwrap();
        spool.start(10, true).unwrap();
        spool.append(b"a1").unwrap();
        spool.stop().unwrap();
        spool.start(11, true).unwrap();
        spool.append(b"b1").unwrap();
        spool.stop().unwrap();
        spool.start(10, false).unwrap();
        spool.append(b"").unwrap();
        spool.append(b"a3").unwrap();
        spool.stop().unwrap();
        assert_eq!(spool.open_transactions(), 2);
        spool.abort(11, 11).unwrap();
        assert!(!dir.join("11.spool").exists());
        spool.abort(10, 12).unwrap();
        let mut replay = spool.commit(10).unwrap();
        assert_eq!(replay.bytes(), 4);
        assert!(replay.is_aborted(12) && !replay.is_aborted(10));
        assert_eq!(drain(&mut replay), vec!["a1", "", "a3"]);
        drop(replay);
        assert!(!dir.join("10.spool").exists());
        assert_eq!(spool.open_transactions(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_session_starts_empty_and_protocol_slips_are_named() {
        let dir = dir("stale");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("7.spool"), b"stale").unwrap();
        fs::write(dir.join("keep.txt"), b"not ours").unwrap();
        let mut spool = Spool::open(&dir).unwrap();
        assert!(!dir.join("7.spool").exists());
        assert!(dir.join("keep.txt").exists());
        let err = spool.start(7, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "streamed transaction 7: a later block without the first"
        );
        assert!(spool.commit(8).is_err());
        assert!(spool.append(b"x").is_err());
        assert!(spool.stop().is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let err = Spool::open(Path::new("/proc/pgcache-no-such-dir")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("spool directory /proc/pgcache-no-such-dir: "),
            "{err}"
        );
    }
}
