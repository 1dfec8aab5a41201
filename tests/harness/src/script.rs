//! The command script: how a command reaches L1.
//!
//! The kernel command line is too small and too fragile for arbitrary arguments, so the host writes a
//! POSIX `sh` script under `target/harness/` (visible inside L1 through the 9p root and the read-write
//! target mount) and puts only its path on the L1 kernel command line. L1's init runs it with `/bin/sh`
//! inside the chroot, with an empty environment and stdin from `/dev/null`. The script changes to the
//! working directory, exports the forwarded environment and `exec`s the command, so its exit status is
//! the command's.
//!
//! Every argument is single-quoted, which in `sh` preserves every byte but `'` itself; a `'` is written as
//! `'\''` (close the quote, an escaped quote, reopen).

use std::fmt::Write as _;
use std::path::Path;

/// Quotes `arg` for a POSIX shell so that it reads back as exactly one word equal to `arg`.
pub fn quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        return arg.to_owned();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Whether `name` can be an environment variable name in `sh` (`export NAME=...`).
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The script that runs `cmd` in `workdir` with exactly the environment `env`.
///
/// Variables whose names `sh` cannot export are skipped.
pub fn command_script(cmd: &[String], workdir: &Path, env: &[(String, String)]) -> String {
    let mut s = String::from("# Written by hull-harness: the command to run inside L1.\n");
    for (name, value) in env.iter().filter(|(name, _)| is_env_name(name)) {
        let _ = writeln!(s, "export {name}={}", quote(value));
    }
    let dir = quote(&workdir.to_string_lossy());
    let _ = writeln!(
        s,
        "cd {dir} || {{ echo \"hull-harness: cannot cd to \"{dir}\" inside L1\" >&2; exit 125; }}"
    );
    let words: Vec<String> = cmd.iter().map(|a| quote(a)).collect();
    let _ = writeln!(s, "exec {}", words.join(" "));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `sh -c 'printf "<%s>\n" WORDS'` and returns what the shell made of the quoted words.
    fn shell_words(words: &[&str]) -> String {
        let quoted: Vec<String> = words.iter().map(|w| quote(w)).collect();
        let script = format!("printf '<%s>\\n' {}", quoted.join(" "));
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("run sh");
        assert!(out.status.success(), "{script}");
        String::from_utf8(out.stdout).expect("utf-8")
    }

    #[test]
    fn plain_words_stay_bare() {
        assert_eq!(quote("target/debug/xtask"), "target/debug/xtask");
        assert_eq!(quote("--timeout=5"), "--timeout=5");
    }

    #[test]
    fn odd_words_are_quoted() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn odd_words_survive_the_shell() {
        let words = [
            "",
            " ",
            "it's",
            "''",
            "\"double\"",
            "$HOME `id` $(id)",
            "back\\slash",
            "new\nline",
            "tab\there",
            "*",
            "a;b&&c|d>e<f",
            "!x",
            "~",
            "ünïcödé",
            "#comment",
            "-n",
        ];
        let expected: String = words.iter().map(|w| format!("<{w}>\n")).collect();
        assert_eq!(shell_words(&words), expected);
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("HULL_X1"));
        assert!(is_env_name("_a"));
        assert!(!is_env_name("1A"));
        assert!(!is_env_name("A-B"));
        assert!(!is_env_name(""));
    }

    #[test]
    fn script_runs_the_command_with_env_and_dir() {
        let dir = std::env::temp_dir();
        let env = vec![
            ("HULL_ODD".to_owned(), "it's a $value".to_owned()),
            ("BAD-NAME".to_owned(), "skipped".to_owned()),
        ];
        let cmd = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "pwd; echo \"$HULL_ODD\"; exit 7".to_owned(),
        ];
        let script = command_script(&cmd, &dir, &env);
        assert!(!script.contains("BAD-NAME"));
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env_clear()
            .output()
            .expect("run sh");
        assert_eq!(out.status.code(), Some(7));
        let dir = dir.canonicalize().expect("canonical temp dir");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}\nit's a $value\n", dir.display())
        );
    }

    #[test]
    fn script_reports_a_missing_dir() {
        let script = command_script(&["true".to_owned()], Path::new("/nonexistent dir"), &[]);
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("run sh");
        assert_eq!(out.status.code(), Some(125));
    }
}
