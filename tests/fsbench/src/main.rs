//! `hull-fsbench DIR [--mib N] [--files N] [--drop-caches]`: the workload of `cargo xtask bench
//! fs`, the same binary on the L1 host and in the guest (static, in the bench initramfs).
//!
//! 1. Sequential write: a `N` MiB file in 1 MiB writes, then `fsync`.
//! 2. Sequential read of that file in 1 MiB reads, after dropping the page cache
//!    (`--drop-caches`: `/proc/sys/vm/drop_caches`, so the read goes through the file system's
//!    transport rather than the guest's cache).
//! 3. Metadata: create (with 1 KiB of data), stat, then unlink `--files` small files; reported
//!    as operations (3 per file) per second.
//!
//! Prints one line, `seq_write_mib_s=… seq_read_mib_s=… meta_ops_s=…`, and removes what it
//! made.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const CHUNK: usize = 1 << 20;

struct Args {
    dir: PathBuf,
    mib: usize,
    files: usize,
    drop_caches: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let (mut mib, mut files, mut drop_caches) = (64, 1000, false);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--mib" => mib = num("--mib")?,
            "--files" => files = num("--files")?,
            "--drop-caches" => drop_caches = true,
            _ if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ if dir.is_none() => dir = Some(PathBuf::from(a)),
            _ => return Err(format!("unexpected argument {a}")),
        }
    }
    let dir = dir.ok_or("usage: hull-fsbench DIR [--mib N] [--files N] [--drop-caches]")?;
    Ok(Args {
        dir,
        mib,
        files,
        drop_caches,
    })
}

/// Drops clean pages; the big file's are clean after its `fsync`.
fn drop_caches() -> std::io::Result<()> {
    fs::write("/proc/sys/vm/drop_caches", "3")
}

fn seq_write(path: &Path, mib: usize) -> std::io::Result<f64> {
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    let mut f = File::create(path)?;
    for _ in 0..mib {
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(mib as f64 / t.elapsed().as_secs_f64())
}

fn seq_read(path: &Path, mib: usize) -> std::io::Result<f64> {
    let mut buf = vec![0u8; CHUNK];
    let t = Instant::now();
    let mut f = File::open(path)?;
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    if total != mib * CHUNK {
        return Err(std::io::Error::other(format!(
            "read {total} bytes back, wrote {}",
            mib * CHUNK
        )));
    }
    Ok(mib as f64 / t.elapsed().as_secs_f64())
}

fn meta(dir: &Path, files: usize) -> std::io::Result<f64> {
    let data = [0x5au8; 1024];
    let names: Vec<PathBuf> = (0..files).map(|i| dir.join(format!("f{i:06}"))).collect();
    let t = Instant::now();
    for n in &names {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(n)?
            .write_all(&data)?;
    }
    for n in &names {
        if fs::metadata(n)?.len() != data.len() as u64 {
            return Err(std::io::Error::other(format!(
                "{} has the wrong size",
                n.display()
            )));
        }
    }
    for n in &names {
        fs::remove_file(n)?;
    }
    Ok((3 * files) as f64 / t.elapsed().as_secs_f64())
}

fn run(a: &Args) -> std::io::Result<String> {
    let work = a.dir.join(format!("hull-fsbench.{}", std::process::id()));
    fs::create_dir(&work)?;
    let big = work.join("big");
    let result = (|| {
        let w = seq_write(&big, a.mib)?;
        if a.drop_caches {
            drop_caches()
                .map_err(|e| std::io::Error::other(format!("cannot drop the page cache: {e}")))?;
        }
        let r = seq_read(&big, a.mib)?;
        fs::remove_file(&big)?;
        let m = meta(&work, a.files)?;
        Ok(format!(
            "seq_write_mib_s={w:.1} seq_read_mib_s={r:.1} meta_ops_s={m:.0}"
        ))
    })();
    let _ = fs::remove_dir_all(&work);
    result
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hull-fsbench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hull-fsbench: in {}: {e}", args.dir.display());
            ExitCode::FAILURE
        }
    }
}
