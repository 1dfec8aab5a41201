//! The guest suites of `cargo xtask test`: run in one L1 boot, and resumed, not restarted, when L1
//! itself fails.
//!
//! L1 (nested SVM emulated by TCG) now and then goes silent or its kernel locks up, more often the
//! longer it runs (harness-notes pitfall 6). Restarting the whole run loses everything done before the
//! failure and gives the next L1 the same long run to fail in; a CI run failed that way with every test
//! it reached passing. So each suite's output is appended to `target/test-logs/<suite>.log`, every
//! test's last result is read back from those logs ([`SuiteLog`]), and the next L1 boot runs only what
//! has no result yet: a suite that finished is left out, the others run with `--exact --skip <test>`
//! for each test that has its result. The test that was running when L1 failed runs again.
//!
//! The harness is asked for one attempt per boot (`max_attempts = 1`); this module decides whether
//! another boot is worth it ([`MAX_BOOTS`], [`RESUME_BUDGET`]).
//!
//! L1's emulated SVM also corrupts an L2 guest now and then: twice, a hung L2 guest's vCPU was
//! found looping at the instruction right after `VMRUN` in L1's own `kvm_amd` module (the
//! nested-SVM emulation handed L2 the host's return address as its `rip`), an address no L2
//! kernel has mapped. Each L1 boot writes where `kvm_amd` is loaded into the suite logs
//! (`== L1 boot N kvm_amd=BASE+SIZE`); a failed test whose own output shows an L2 vCPU state
//! (`rip=0x…`, from hull-vmm's state dump) inside that range failed on the harness, not on Hull,
//! and runs once more in another boot ([`SuiteLog::harness_faults`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use hull_harness::script::quote;

use crate::harness;

/// At most this many L1 boots for one test run (one full run here has needed 5: L1 hung or
/// panicked 4 times, in four different suites).
pub const MAX_BOOTS: u32 = 8;
/// No new L1 boot is started once the guest suites have run this long: CI gives the whole run 90 min.
pub const RESUME_BUDGET: Duration = Duration::from_secs(45 * 60);
/// Wall-clock limit of one L1 boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A guest test binary.
#[derive(Debug, Clone)]
pub struct Suite {
    /// Its name (`guest_boot`, …).
    pub name: String,
    /// The test executable.
    pub exe: PathBuf,
}

/// The environment every suite gets inside L1 (`export NAME=VALUE`).
pub type SuiteEnv = Vec<(String, String)>;

/// A test's result as libtest printed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestResult {
    /// `ok`
    Passed,
    /// `FAILED`
    Failed,
    /// `ignored`
    Ignored,
}

/// What a suite's log shows: each test's last result, and whether the binary ever printed its summary.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SuiteLog {
    /// The last result of each test that has one.
    pub results: BTreeMap<String, TestResult>,
    /// A `test result:` summary line was printed: the binary got to its end.
    pub finished: bool,
    /// The last test that was started (`test NAME ... ` with no result yet, as when L1 died under it).
    pub unfinished: Option<String>,
    /// Failed tests whose output shows an L2 vCPU at an address of L1's `kvm_amd` module, with
    /// that evidence: the harness's nested SVM corrupted the guest (see the module's doc).
    pub harness_faults: BTreeMap<String, String>,
}

/// Reads where `kvm_amd` is loaded from `/proc/modules` (`NAME SIZE REFS DEPS STATE BASE`; BASE is
/// shown to root only, zeros to others): `BASE+SIZE`, or nothing.
const KVM_AMD_AWK: &str = r#"$1 == "kvm_amd" && $6 ~ /^0x/ && $6 !~ /^0x0+$/ { print $6 "+" $2 }"#;

/// Where L1's `kvm_amd` module was loaded in a boot: `[base, base + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModuleRange {
    base: u64,
    size: u64,
}

impl ModuleRange {
    /// From the suite log's boot line: `== L1 boot N kvm_amd=0xBASE+SIZE`.
    fn from_boot_line(line: &str) -> Option<Self> {
        let spec = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("kvm_amd="))?;
        let (base, size) = spec.split_once('+')?;
        Some(Self {
            base: u64::from_str_radix(base.strip_prefix("0x")?, 16).ok()?,
            size: size.parse().ok()?,
        })
    }

    /// The first `rip=0x…` in `line` that lies inside the module.
    fn rip_inside(&self, line: &str) -> Option<u64> {
        line.match_indices("rip=0x").find_map(|(at, m)| {
            let hex: String = line[at + m.len()..]
                .chars()
                .take_while(char::is_ascii_hexdigit)
                .collect();
            let rip = u64::from_str_radix(&hex, 16).ok()?;
            (rip >= self.base && rip - self.base < self.size).then_some(rip)
        })
    }
}

impl SuiteLog {
    /// Reads libtest's (`--test-threads=1`) output, possibly several runs appended.
    pub fn parse(text: &str) -> Self {
        let mut log = SuiteLog::default();
        // The boot this part of the log comes from, and the failed test whose output is being read.
        let mut kvm_amd = None;
        let mut failure: Option<String> = None;
        for line in text.lines() {
            if line.starts_with("== L1 boot ") {
                kvm_amd = ModuleRange::from_boot_line(line);
                failure = None;
                continue;
            }
            if let Some(name) = line
                .strip_prefix("---- ")
                .and_then(|l| l.strip_suffix(" stdout ----"))
            {
                failure = Some(name.to_owned());
                continue;
            }
            if line == "failures:" {
                failure = None;
                continue;
            }
            if let (Some(name), Some(range)) = (&failure, kvm_amd) {
                if let Some(rip) = range.rip_inside(line) {
                    log.harness_faults.entry(name.clone()).or_insert_with(|| {
                        format!(
                            "an L2 vCPU at rip={rip:#x}, inside L1's kvm_amd ({:#x}+{})",
                            range.base, range.size
                        )
                    });
                }
            }
            if line.starts_with("test result: ") {
                log.finished = true;
                log.unfinished = None;
                failure = None;
                continue;
            }
            if line.starts_with("running ") {
                log.finished = false;
                continue;
            }
            let Some(rest) = line.strip_prefix("test ") else {
                continue;
            };
            let Some((name, result)) = rest.split_once(" ... ") else {
                continue;
            };
            let result = match result.trim() {
                "ok" => Some(TestResult::Passed),
                "FAILED" => Some(TestResult::Failed),
                r if r.starts_with("ignored") => Some(TestResult::Ignored),
                _ => None,
            };
            match result {
                Some(r) => {
                    log.results.insert(name.to_owned(), r);
                    log.harness_faults.remove(name);
                    log.unfinished = None;
                }
                None => log.unfinished = Some(name.to_owned()),
            }
        }
        log
    }

    /// The tests whose last result is a failure the harness caused (see [`SuiteLog::harness_faults`]).
    pub fn failed_on_harness(&self) -> impl Iterator<Item = (&String, &String)> {
        self.harness_faults
            .iter()
            .filter(|(t, _)| self.results.get(*t) == Some(&TestResult::Failed))
    }

    /// How many tests have each result: (passed, failed, ignored).
    pub fn tally(&self) -> (u64, u64, u64) {
        let count = |want| self.results.values().filter(|r| **r == want).count() as u64;
        (
            count(TestResult::Passed),
            count(TestResult::Failed),
            count(TestResult::Ignored),
        )
    }
}

/// The shell script of one L1 boot: every suite not yet finished or with a test in `rerun`
/// (`suite/test`), each skipping the tests that already have a result but those in `rerun`, output
/// appended to its log after a line naming the boot and where L1's `kvm_amd` is. Exits 1 if any
/// suite failed.
pub fn script(
    suites: &[Suite],
    logs: &BTreeMap<String, SuiteLog>,
    rerun: &BTreeSet<String>,
    env: &SuiteEnv,
    dir: &Path,
    boot: u32,
) -> String {
    let mut s = format!(
        "st=0\nkvm_amd=$(awk {} /proc/modules 2>/dev/null)\n",
        quote(KVM_AMD_AWK)
    );
    for (name, value) in env {
        let _ = writeln!(s, "export {name}={}", quote(value));
    }
    for suite in suites {
        let log = logs.get(&suite.name);
        let prefix = format!("{}/", suite.name);
        let has_rerun = rerun.iter().any(|r| r.starts_with(&prefix));
        if log.is_some_and(|l| l.finished) && !has_rerun {
            continue;
        }
        let path = dir.join(format!("{}.log", suite.name));
        let mut words = vec![
            suite.exe.to_string_lossy().into_owned(),
            path.to_string_lossy().into_owned(),
            "--test-threads=1".to_owned(),
        ];
        let done: Vec<&String> = log
            .map(|l| {
                l.results
                    .keys()
                    .filter(|t| !rerun.contains(&format!("{}/{t}", suite.name)))
                    .collect()
            })
            .unwrap_or_default();
        if !done.is_empty() {
            words.push("--exact".to_owned());
            for test in done {
                words.push("--skip".to_owned());
                words.push(test.clone());
            }
        }
        let words: Vec<String> = words.iter().map(|w| quote(w)).collect();
        let _ = writeln!(
            s,
            "echo '== guest suite {name} (L1 boot {boot})'\n\
             echo \"== L1 boot {boot}${{kvm_amd:+ kvm_amd=$kvm_amd}}\" >> {log}\n\
             bash -o pipefail -c 'log=$1; shift; \"$0\" \"$@\" 2>&1 | tee -a \"$log\"' {words} || st=1",
            name = suite.name,
            log = quote(&path.to_string_lossy()),
            words = words.join(" "),
        );
    }
    s.push_str("exit $st\n");
    s
}

/// Reads every suite's log in `dir` (a missing log is an empty one).
fn read_logs(suites: &[Suite], dir: &Path) -> BTreeMap<String, SuiteLog> {
    suites
        .iter()
        .map(|s| {
            let text =
                std::fs::read_to_string(dir.join(format!("{}.log", s.name))).unwrap_or_default();
            (s.name.clone(), SuiteLog::parse(&text))
        })
        .collect()
}

/// The failed tests to run again because the harness failed them ([`SuiteLog::harness_faults`]),
/// as `suite/test`, each at most once per test run (`retried` remembers), said on stdout.
fn harness_reruns(
    logs: &BTreeMap<String, SuiteLog>,
    retried: &mut BTreeSet<String>,
) -> BTreeSet<String> {
    let mut rerun = BTreeSet::new();
    for (name, log) in logs {
        for (test, why) in log.failed_on_harness() {
            let key = format!("{name}/{test}");
            if retried.insert(key.clone()) {
                println!(
                    "xtask: {name} {test} FAILED with {why}: L1's nested SVM corrupted that guest, \
                     not Hull; it runs again (once)"
                );
                rerun.insert(key);
            }
        }
    }
    rerun
}

/// Runs the suites in as few L1 boots as L1 allows; returns (passed, failed, ignored). A suite that
/// never finished counts one failure (the test it was in, named).
pub fn run(suites: &[Suite], env: &SuiteEnv, dir: &Path) -> Result<(u64, u64, u64)> {
    std::fs::create_dir_all(dir)?;
    for suite in suites {
        let _ = std::fs::remove_file(dir.join(format!("{}.log", suite.name)));
    }
    let t0 = Instant::now();
    let mut any_failed = false;
    let mut rerun = BTreeSet::new();
    // Tests already run again for a harness fault: once each.
    let mut retried = BTreeSet::new();
    for boot in 1..=MAX_BOOTS {
        let logs = read_logs(suites, dir);
        if rerun.is_empty() && logs.values().all(|l| l.finished) {
            break;
        }
        let mut opts = harness::options(BOOT_TIMEOUT);
        opts.max_attempts = 1;
        let text = script(suites, &logs, &rerun, env, dir, boot);
        let another_boot = boot < MAX_BOOTS && t0.elapsed() < RESUME_BUDGET;
        match hull_harness::run_script(&text, &opts) {
            Ok(status) => {
                any_failed = status != 0;
                rerun = if any_failed && another_boot {
                    harness_reruns(&read_logs(suites, dir), &mut retried)
                } else {
                    BTreeSet::new()
                };
                if rerun.is_empty() {
                    break;
                }
                println!(
                    "xtask: booting L1 again for the tests the harness failed (boot {} of at most \
                     {MAX_BOOTS})",
                    boot + 1
                );
            }
            Err(e) if e.is_l1_failure() && another_boot => {
                let logs = read_logs(suites, dir);
                let done: usize = logs.values().map(|l| l.results.len()).sum();
                // libtest prints why a test failed only when the whole binary ends: in a suite that
                // L1 cut short, a failure's message is lost, and L1 may have been failing under it.
                // Such a test runs again.
                rerun = harness_reruns(&logs, &mut retried);
                for (name, log) in logs.iter().filter(|(_, l)| !l.finished) {
                    for (test, _) in log
                        .results
                        .iter()
                        .filter(|(_, r)| **r == TestResult::Failed)
                    {
                        println!(
                            "xtask: {name} {test} FAILED in the L1 boot that was cut short, its message \
                             lost: it runs again"
                        );
                        rerun.insert(format!("{name}/{test}"));
                    }
                }
                println!(
                    "xtask: L1 FAILED under the guest suites ({e}). {done} guest tests have their \
                     result; booting L1 again for the rest (boot {} of at most {MAX_BOOTS})",
                    boot + 1
                );
            }
            Err(e) => {
                println!("xtask: the guest suites could not finish: {e:#}");
                any_failed = true;
                break;
            }
        }
    }
    let logs = read_logs(suites, dir);
    let mut total = (0, 0, 0);
    for (name, log) in &logs {
        let (p, f, i) = log.tally();
        total.0 += p;
        total.1 += f;
        total.2 += i;
        if !log.finished {
            total.1 += 1;
            match &log.unfinished {
                Some(test) => println!("xtask: guest suite {name} never finished: {test} has no result (counted as failed)"),
                None => println!("xtask: guest suite {name} never finished (counted as failed)"),
            }
        }
    }
    if any_failed && total.1 == 0 {
        total.1 += 1; // a suite binary that exited non-zero without a failed test
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_of_appended_runs_the_last_wins() {
        let text = "\nrunning 3 tests\n\
            test a ... ok\n\
            test b ... FAILED\n\
            test c ... \n\
            == L1 boot 2\n\
            \nrunning 2 tests\n\
            test b ... ok\n\
            test c ... ignored, slow\n\
            \ntest result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out\n";
        let log = SuiteLog::parse(text);
        assert!(log.finished);
        assert_eq!(log.unfinished, None);
        assert_eq!(log.results["a"], TestResult::Passed);
        assert_eq!(log.results["b"], TestResult::Passed);
        assert_eq!(log.results["c"], TestResult::Ignored);
        assert_eq!(log.tally(), (2, 0, 1));
    }

    #[test]
    fn a_run_cut_short_names_the_test_it_was_in() {
        let log = SuiteLog::parse("running 3 tests\ntest a ... ok\ntest b ... ");
        assert!(!log.finished);
        assert_eq!(log.unfinished.as_deref(), Some("b"));
        assert_eq!(log.tally(), (1, 0, 0));
        assert_eq!(SuiteLog::parse(""), SuiteLog::default());
    }

    fn suites() -> Vec<Suite> {
        ["guest_a", "guest_b", "guest_c"]
            .into_iter()
            .map(|n| Suite {
                name: n.to_owned(),
                exe: PathBuf::from(format!("/bin/{n}")),
            })
            .collect()
    }

    #[test]
    fn the_script_runs_only_what_has_no_result() {
        let mut logs = BTreeMap::new();
        logs.insert(
            "guest_a".to_owned(),
            SuiteLog::parse("running 1 test\ntest x ... ok\ntest result: ok. 1 passed;\n"),
        );
        logs.insert(
            "guest_b".to_owned(),
            SuiteLog::parse("running 3 tests\ntest y ... ok\ntest it's ... FAILED\ntest w ... "),
        );
        let env = vec![("HULL_X".to_owned(), "a b".to_owned())];
        let rerun = BTreeSet::from(["guest_b/it's".to_owned()]);
        let s = script(&suites(), &logs, &rerun, &env, Path::new("/logs"), 2);
        assert!(s.starts_with("st=0\nkvm_amd=$(awk "), "{s}");
        assert!(s.contains("\nexport HULL_X='a b'\n"), "{s}");
        assert!(!s.contains("guest_a"), "{s}");
        assert!(
            s.contains("/bin/guest_b /logs/guest_b.log --test-threads=1 --exact --skip y || st=1"),
            "{s}"
        );
        assert!(
            s.contains("/bin/guest_c /logs/guest_c.log --test-threads=1 || st=1"),
            "{s}"
        );
        assert!(s.ends_with("exit $st\n"));
        // Without the rerun, the failed test is skipped like the passed one (quoted for sh).
        let s = script(
            &suites(),
            &logs,
            &BTreeSet::new(),
            &env,
            Path::new("/logs"),
            2,
        );
        assert!(
            s.contains("--test-threads=1 --exact --skip 'it'\\''s' --skip y || st=1"),
            "{s}"
        );
    }

    const FAILED_IN_L1: &str = "== L1 boot 1 kvm_amd=0xffffffffc0453000+155648\n\
        running 3 tests\n\
        test hung ... FAILED\n\
        test broken ... FAILED\n\
        test fine ... ok\n\
        \nfailures:\n\n\
        ---- hung stdout ----\n\
        ERROR hull_vmm::kvm::vcpu: vCPU state on request (SIGUSR2) vcpu=0 rip=0xffffffffc046720c rsp=0xffffc90001c33cc0\n\
        ---- broken stdout ----\n\
        assertion failed; vcpu=0 rip=0xffffffff8104720c\n\
        \nfailures:\n    hung\n    broken\n\n\
        test result: FAILED. 1 passed; 2 failed\n";

    #[test]
    fn a_failure_with_an_l2_vcpu_inside_l1s_kvm_amd_is_the_harness() {
        let log = SuiteLog::parse(FAILED_IN_L1);
        assert!(log.finished);
        assert_eq!(log.tally(), (1, 2, 0));
        let faults: Vec<_> = log.failed_on_harness().collect();
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].0, "hung");
        assert!(
            faults[0].1.contains("rip=0xffffffffc046720c"),
            "{}",
            faults[0].1
        );
        // Run again in another boot and passed: nothing left to blame on the harness.
        let again = format!(
            "{FAILED_IN_L1}== L1 boot 2 kvm_amd=0xffffffffc0200000+155648\n\
             running 1 test\ntest hung ... ok\ntest result: ok.\n"
        );
        let log = SuiteLog::parse(&again);
        assert_eq!(log.failed_on_harness().count(), 0);
        assert_eq!(log.tally(), (2, 1, 0));
        // The same rip in a boot whose kvm_amd is elsewhere (or unknown) is no evidence.
        for boot in [
            "== L1 boot 1 kvm_amd=0xffffffffc0800000+155648",
            "== L1 boot 1",
        ] {
            let text =
                FAILED_IN_L1.replacen("== L1 boot 1 kvm_amd=0xffffffffc0453000+155648", boot, 1);
            assert_eq!(SuiteLog::parse(&text).failed_on_harness().count(), 0);
        }
    }

    #[test]
    fn a_harness_failure_runs_again_once_and_alone() {
        let mut logs = BTreeMap::new();
        logs.insert("guest_a".to_owned(), SuiteLog::parse(FAILED_IN_L1));
        logs.insert(
            "guest_b".to_owned(),
            SuiteLog::parse("running 1 test\ntest x ... ok\ntest result: ok.\n"),
        );
        let mut retried = BTreeSet::new();
        let rerun = harness_reruns(&logs, &mut retried);
        assert_eq!(rerun, BTreeSet::from(["guest_a/hung".to_owned()]));
        assert!(harness_reruns(&logs, &mut retried).is_empty());
        // The finished suite runs again, skipping all but that test; the other is left out.
        let s = script(&suites(), &logs, &rerun, &vec![], Path::new("/logs"), 2);
        assert!(
            s.contains("/bin/guest_a /logs/guest_a.log --test-threads=1 --exact --skip broken --skip fine || st=1"),
            "{s}"
        );
        assert!(!s.contains("/bin/guest_b"), "{s}");
    }

    #[test]
    fn the_boot_line_finds_kvm_amd_in_proc_modules() {
        let dir = std::env::temp_dir().join(format!("xtask-kvm-amd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let modules = dir.join("modules");
        std::fs::write(
            &modules,
            "kvm 1105920 1 kvm_amd, Live 0xffffffffc0200000\n\
             kvm_amd 155648 0 - Live 0xffffffffc0453000\n\
             ccp 114688 1 kvm_amd, Live 0xffffffffc0400000\n",
        )
        .unwrap();
        let out = std::process::Command::new("awk")
            .arg(KVM_AMD_AWK)
            .arg(&modules)
            .output()
            .unwrap();
        let line = format!(
            "== L1 boot 1 kvm_amd={}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        assert_eq!(
            ModuleRange::from_boot_line(&line),
            Some(ModuleRange {
                base: 0xffffffffc0453000,
                size: 155648
            })
        );
        // Unprivileged readers see zero addresses: no range then.
        std::fs::write(&modules, "kvm_amd 155648 0 - Live 0x0000000000000000\n").unwrap();
        let out = std::process::Command::new("awk")
            .arg(KVM_AMD_AWK)
            .arg(&modules)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The script really appends, really skips, and reports a failing suite: run with `sh` against
    /// stand-in test binaries.
    #[test]
    fn the_script_appends_skips_and_fails_like_the_suites() {
        let dir = std::env::temp_dir().join(format!("xtask-guest-suites-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A stand-in libtest: prints its arguments as if each were a test; fails when asked to.
        let fake = dir.join("fake");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"running $#\"\nfor a in \"$@\"; do echo \"test $a ... ok\"; done\n\
             echo 'test result: ok.'\n[ -z \"$FAIL\" ]\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(dir.join("guest_a.log"), "earlier line\n").unwrap();
        let suites = vec![Suite {
            name: "guest_a".to_owned(),
            exe: fake.clone(),
        }];
        let mut logs = BTreeMap::new();
        logs.insert("guest_a".to_owned(), SuiteLog::parse("test done ... ok\n"));
        let text = script(&suites, &logs, &BTreeSet::new(), &vec![], &dir, 2);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&text)
            .env("FAIL", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let log = std::fs::read_to_string(dir.join("guest_a.log")).unwrap();
        // The boot line names kvm_amd only where it is loaded (in L1, not on this host).
        assert!(log.starts_with("earlier line\n== L1 boot 2"), "{log}");
        assert!(log.contains("\nrunning 4\n"), "{log}");
        assert!(
            log.contains("test --skip ... ok\ntest done ... ok\n"),
            "{log}"
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&text)
            .env_remove("FAIL")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
