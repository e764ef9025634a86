//! The storage layer, under everything else: atomic writes, records appended per batch,
//! content hashes, and a step's `meta.json` ([`meta`]). Engine, steps, backends and reports
//! all keep their files through it.

pub mod meta;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    // Made as `File::create` makes a file (0o666 less the umask), not owner-only as temporary
    // files are: a run's files are read by other users (a CI uploader) as its records are.
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut file = builder.tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Hash of a file's content, streamed.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Hash of a step's output: every file of its directory but `meta.json` and unfinished parts,
/// by name and content.
pub fn hash_output(dir: &Path) -> io::Result<String> {
    let mut names: Vec<PathBuf> = vec![];
    collect(dir, dir, &mut names)?;
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        hasher.update(name.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(hash_file(&dir.join(&name))?.as_bytes());
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect(root, &path, out)?;
            continue;
        }
        let name = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let is_meta = name == Path::new(META);
        let unfinished = name.extension().is_some_and(|e| e == "partial" || e == "tmp");
        if !is_meta && !unfinished {
            out.push(name);
        }
    }
    Ok(())
}

/// The file a run holds locked in its directory while it runs (`seedflow run` takes the lock).
pub const RUN_LOCK: &str = ".seedflow.lock";

/// Whether a run holds the directory's lock: it is running now. A probe, writing nothing.
pub fn run_in_progress(dir: &Path) -> bool {
    std::fs::File::open(dir.join(RUN_LOCK))
        .is_ok_and(|lock| matches!(lock.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)))
}

pub const META: &str = "meta.json";
pub const RECORDS: &str = "output.jsonl";
const PARTIAL: &str = "output.jsonl.partial";

/// A step's records, appended a batch at a time to `output.jsonl.partial` and renamed to
/// `output.jsonl` when the step finishes: a crash loses at most the batch being written.
pub struct RecordWriter {
    file: File,
    partial: PathBuf,
    finished: PathBuf,
    pub count: usize,
    /// Where each kept record of the earlier run ends in the file.
    kept_ends: Vec<u64>,
}

impl RecordWriter {
    /// Opens the step's record file, keeping complete records of an earlier, unfinished run
    /// (returned as JSON lines) and dropping a torn last line.
    pub fn open(dir: &Path, keep_partial: bool) -> io::Result<(RecordWriter, Vec<String>)> {
        fs::create_dir_all(dir)?;
        let partial = dir.join(PARTIAL);
        let mut kept = vec![];
        let mut kept_ends = vec![];
        if keep_partial && partial.exists() {
            let reader = BufReader::new(File::open(&partial)?);
            let mut good_bytes = 0u64;
            let mut text = String::new();
            let mut reader = reader;
            loop {
                text.clear();
                let read = reader.read_line(&mut text)?;
                if read == 0 || !text.ends_with('\n') {
                    break;
                }
                if serde_json::from_str::<serde_json::Value>(text.trim_end()).is_err() {
                    break;
                }
                good_bytes += read as u64;
                kept.push(text.trim_end().to_string());
                kept_ends.push(good_bytes);
            }
            OpenOptions::new().write(true).open(&partial)?.set_len(good_bytes)?;
        } else {
            File::create(&partial)?;
        }
        let file = OpenOptions::new().append(true).open(&partial)?;
        let count = kept.len();
        Ok((RecordWriter { file, partial, finished: dir.join(RECORDS), count, kept_ends }, kept))
    }

    /// Keeps only the first `n` records the earlier run wrote, before anything is appended: a
    /// step whose records go in groups drops a group that an interruption cut short, so that
    /// the group is written again whole, once.
    pub fn keep_first(&mut self, n: usize) -> io::Result<()> {
        if n < self.count {
            self.file.set_len(if n == 0 { 0 } else { self.kept_ends[n - 1] })?;
            self.file.sync_data()?;
            self.count = n;
            self.kept_ends.truncate(n);
        }
        Ok(())
    }

    /// Appends a batch of records and makes it durable.
    pub fn append<T: serde::Serialize>(&mut self, records: &[T]) -> io::Result<()> {
        let mut buffer = Vec::new();
        for record in records {
            serde_json::to_writer(&mut buffer, record).map_err(io::Error::other)?;
            buffer.push(b'\n');
        }
        self.file.write_all(&buffer)?;
        self.file.sync_data()?;
        self.count += records.len();
        Ok(())
    }

    pub fn finish(self) -> io::Result<()> {
        self.file.sync_all()?;
        fs::rename(&self.partial, &self.finished)
    }
}

/// Reads a records file written by [`RecordWriter`].
pub fn read_records<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Vec<T>> {
    let reader = BufReader::new(File::open(path)?);
    let mut out = vec![];
    for (number, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}:{}: {e}", path.display(), number + 1))
        })?;
        out.push(record);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(unix)]
    fn an_atomic_write_makes_a_file_as_create_does() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("summary.json"), b"{}").unwrap();
        File::create(dir.path().join("output.jsonl")).unwrap();
        let mode = |name: &str| fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("summary.json"), mode("output.jsonl"));
    }

    #[test]
    fn partial_records_survive_and_torn_lines_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, kept) = RecordWriter::open(dir.path(), true).unwrap();
        assert!(kept.is_empty());
        writer.append(&[1, 2]).unwrap();
        drop(writer);
        // A crash in the middle of a line.
        let mut file = OpenOptions::new().append(true).open(dir.path().join(PARTIAL)).unwrap();
        file.write_all(b"{\"torn\": ").unwrap();
        let (mut writer, kept) = RecordWriter::open(dir.path(), true).unwrap();
        assert_eq!(kept, vec!["1", "2"]);
        writer.append(&[3]).unwrap();
        writer.finish().unwrap();
        assert_eq!(read_records::<i32>(&dir.path().join(RECORDS)).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn a_group_cut_short_is_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = RecordWriter::open(dir.path(), true).unwrap();
        writer.append(&[1, 2, 3]).unwrap();
        drop(writer);
        let (mut writer, kept) = RecordWriter::open(dir.path(), true).unwrap();
        assert_eq!(kept.len(), 3);
        writer.keep_first(2).unwrap();
        writer.append(&[30, 40]).unwrap();
        assert_eq!(writer.count, 4);
        writer.finish().unwrap();
        assert_eq!(read_records::<i32>(&dir.path().join(RECORDS)).unwrap(), vec![1, 2, 30, 40]);
    }

    #[test]
    fn output_hash_ignores_meta_and_follows_content() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("a.txt"), b"one").unwrap();
        let first = hash_output(dir.path()).unwrap();
        write_atomic(&dir.path().join(META), b"{}").unwrap();
        assert_eq!(hash_output(dir.path()).unwrap(), first);
        write_atomic(&dir.path().join("a.txt"), b"two").unwrap();
        assert_ne!(hash_output(dir.path()).unwrap(), first);
    }
}
