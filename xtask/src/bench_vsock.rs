//! `cargo xtask bench vsock`: host → guest → host throughput through hybrid vsock (the agent's echo
//! service behind hull-vmm's virtio-vsock device), beside the same transfer over loopback TCP to an
//! echo server on the same machine (inside L1 in the harness). Reports MiB/s of data echoed, medians
//! of several transfers, and `vsock_mib_s hull=… loopback=… ratio=…` as the last line.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::InnerArgs;

const ECHO_PORT: u32 = 5000;
const TRANSFER: usize = 64 << 20;
const CHUNK: usize = 64 << 10;

/// Writes `TRANSFER` bytes on `w` while reading them back from `r`; returns MiB/s.
fn echo_transfer<W: Write + Send + 'static, R: Read>(mut w: W, mut r: R) -> Result<f64> {
    let start = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let buf = vec![0x5au8; CHUNK];
        let mut left = TRANSFER;
        while left > 0 {
            let n = left.min(CHUNK);
            w.write_all(&buf[..n])?;
            left -= n;
        }
        Ok(())
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < TRANSFER {
        let n = r.read(&mut buf)?;
        if n == 0 {
            bail!("echo stream closed after {got} of {TRANSFER} bytes");
        }
        got += n;
    }
    writer.join().expect("writer thread")?;
    Ok(TRANSFER as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}

fn hybrid_connect(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(s)
}

/// CPU seconds (user + system) of each thread of process `pid`, by thread name.
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let tick = 100.0; // USER_HZ
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        out.push((name, (num(11) + num(12)) / tick));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The part that runs where guests boot.
pub fn inner(a: &InnerArgs) -> Result<()> {
    let mut vm = a.spawn_agent_vm(&format!(
        "{} agent.echo_port={ECHO_PORT}",
        crate::bench::BENCH_CMDLINE
    ))?;
    let client = vm.wait_agent(Duration::from_secs(300))?;
    let uds = vm.uds.clone();

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut r = s;
                let mut w = r.try_clone().expect("clone");
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });

    println!(
        "bench vsock: {} MiB echoed per transfer, {} transfers each, alternating",
        TRANSFER >> 20,
        a.runs
    );
    let (mut h, mut l) = (Vec::new(), Vec::new());
    let cpu_before = thread_cpu(vm.pid());
    let mut hull_secs = 0.0;
    for i in 0..a.runs {
        let s = hybrid_connect(&uds, ECHO_PORT).context("vsock echo stream")?;
        let t0 = Instant::now();
        let hull = echo_transfer(s.try_clone()?, s)?;
        hull_secs += t0.elapsed().as_secs_f64();
        let t = TcpStream::connect(addr)?;
        let lo = echo_transfer(t.try_clone()?, t)?;
        println!("run {i:2} hull_vsock_mib_s={hull:8.1} loopback_tcp_mib_s={lo:8.1}");
        h.push(hull);
        l.push(lo);
    }
    // Where hull-vmm spent CPU during the vsock transfers (and the loopback ones: idle there).
    let cpu_after = thread_cpu(vm.pid());
    for (name, after) in &cpu_after {
        let before = cpu_before
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |b| b.1);
        println!(
            "hull-vmm thread {name:12} cpu_s={:.2} over {hull_secs:.1} s of vsock transfers",
            after - before
        );
    }
    let (ok, stderr) = vm.destroy(&client)?;
    if !ok {
        bail!("hull-vmm failed after DestroySandbox: {stderr}");
    }
    let (hm, lm) = (median(h), median(l));
    println!(
        "vsock_mib_s hull={hm:.1} loopback={lm:.1} ratio={:.3}",
        hm / lm
    );
    Ok(())
}
