//! The `ballast` command as an operator uses it: `check` on good and bad files, exit
//! codes, `--version`, and `run` from start to a graceful SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ballast");

fn ballast(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("ballast runs")
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn version_prints_the_name_and_version() {
    let out = ballast(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ballast {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_usage_error_exits_1() {
    let out = ballast(&["run", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(1));
    let out = ballast(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn check_accepts_every_shipped_config_and_every_valid_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = toml_files(&root.join("conf"));
    files.extend(toml_files(&root.join("tests/config/valid")));
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        let out = ballast(&["check", "--config", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{} should be valid: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    }
}

/// The `# expect: TEXT` and `# at: LINE:COL` lines at the top of a fixture: every TEXT
/// must be in the output, and a problem must be reported at every LINE:COL.
fn fixture_expectations(text: &str) -> (Vec<&str>, Vec<&str>) {
    let header = text.lines().take_while(|l| l.starts_with("# "));
    let (mut expect, mut at) = (Vec::new(), Vec::new());
    for line in header {
        if let Some(e) = line.strip_prefix("# expect: ") {
            expect.push(e);
        } else if let Some(a) = line.strip_prefix("# at: ") {
            at.push(a);
        }
    }
    (expect, at)
}

/// Whether `line` reads `FILE:LINE:COL: message`.
fn is_located(line: &str, file: &str) -> bool {
    let Some(rest) = line.strip_prefix(&format!("{file}:")) else {
        return false;
    };
    let mut parts = rest.splitn(3, ':');
    let numbers = parts
        .by_ref()
        .take(2)
        .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    numbers
        && parts
            .next()
            .is_some_and(|m| m.starts_with(' ') && m.len() > 1)
}

#[test]
fn check_rejects_every_invalid_fixture_with_exit_1_and_a_message_naming_the_problem() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = toml_files(&root.join("tests/config/invalid"));
    assert!(files.len() >= 25);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let (expect, at) = fixture_expectations(&text);
        assert!(
            !expect.is_empty(),
            "{} has no '# expect:' line",
            file.display()
        );
        let name = file.to_str().unwrap();
        let out = ballast(&["check", "--config", name]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", file.display());
        assert!(out.stdout.is_empty());
        for expect in expect {
            assert!(
                stderr.contains(expect),
                "{}: expected {expect:?} in:\n{stderr}",
                file.display()
            );
        }
        for at in at {
            assert!(
                stderr.contains(&format!("{name}:{at}: ")),
                "{}: expected a problem at {at} in:\n{stderr}",
                file.display()
            );
        }
        for line in stderr.lines() {
            assert!(
                is_located(line, name),
                "every line reads FILE:LINE:COL: message: {line:?}"
            );
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn semantic_errors_name_the_line_and_column_of_the_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = root.join("tests/config/invalid/weight_zero.toml");
    let out = ballast(&["check", "--config", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // `  weight = 0` is line 9 of the fixture; its value starts in column 12.
    assert!(
        stderr.starts_with(&format!("{}:9:12: ", file.display())),
        "{stderr}"
    );
}

#[test]
fn check_lists_every_mistake_of_a_file_each_at_its_own_key_in_plain_words() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:18080\"\nstratgy = \"round_robin\"\nconnect_timeout = 2\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:3001\"\n  weight = \"2\"\n",
    );
    let out = ballast(&["check", "--config", config.to_str().unwrap()]);
    let file = config.display();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{file}:4:1: unknown key \"stratgy\" in [[listeners]]: did you mean \"strategy\"?\n\
             {file}:5:19: listener \"web\": connect_timeout must be a duration in quotes, like \"2s\" (units ms, s, m, h), not the number 2\n\
             {file}:9:12: listener \"web\": backends[0].weight must be a whole number >= 1, like weight = 2, not the string \"2\" (numbers go without quotes)\n"
        )
    );
}

#[test]
fn run_reports_a_bad_config_in_the_same_format_as_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:3001\"\n  weight = 0\n",
    );
    let path = config.to_str().unwrap();
    let run = ballast(&["run", "--config", path]);
    let check = ballast(&["check", "--config", path]);
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.starts_with(&format!("{path}:7:12: ")), "{stderr}");
    assert_eq!(run.stderr, check.stderr);
}

#[test]
fn check_of_a_missing_file_exits_1() {
    let out = ballast(&["check", "--config", "/nonexistent/ballast.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ballast.toml: cannot read"));
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn run_exits_2_naming_the_listener_when_its_port_is_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &format!("[[listeners]]\nname = \"web\"\nbind = \"{addr}\"\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:1\"\n"),
    );
    let out = ballast(&["run", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listener \"web\""), "{stderr}");
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn run_exits_1_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "[[listeners]]\nname = \"web\"\n");
    let out = ballast(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_proxies_and_exits_0_on_sigterm() {
    let backend = common::Backend::greeter("app").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[runtime]\nthreads = 1\nshutdown_timeout = \"5s\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
            common::backends_toml(&[("app", backend.addr, 1)])
        ),
    );
    let proc = common::Proc::run(&config, &[], 1).await;
    let (web, admin) = (proc.listeners["web"], proc.admin);
    let (status, body) = common::http(admin, "GET", "/api/v1/status").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["listeners"][0]["bind"], web.to_string());

    let (_held, name) = common::connect_and_greet(web).await;
    assert_eq!(name, "app");
    drop(_held);

    let started = Instant::now();
    let (status, log) = proc.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit waits for connections, not a fixed grace"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// A config that asks for far more worker threads than any machine can start.
fn hundred_thousand_threads(dir: &tempfile::TempDir) -> PathBuf {
    write_config(
        dir,
        "[runtime]\nthreads = 100000\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:1\"\n",
    )
}

#[test]
fn check_refuses_more_worker_threads_than_the_machine_can_run_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = hundred_thousand_threads(&dir);
    let out = ballast(&["check", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2:11: runtime.threads", config.display())),
        "{stderr}"
    );
}

#[test]
fn run_with_too_many_worker_threads_exits_with_the_reason_instead_of_aborting() {
    let dir = tempfile::tempdir().unwrap();
    let config = hundred_thousand_threads(&dir);
    let mut child = common::KillOnDrop(
        Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "run with threads = 100000 did not exit within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        matches!(status.code(), Some(1 | 2)),
        "exit {status:?}, not 1 or 2: {stderr}"
    );
    assert!(stderr.contains("runtime.threads"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// How a `ballast run` under an address-space limit went.
#[cfg(target_os = "linux")]
enum Start {
    /// It ended by itself.
    Exited(std::process::ExitStatus),
    /// It bound its listener and served (it is then killed), with the most address
    /// space it had taken by then, in KiB.
    Served { vm_peak_kib: u64 },
}

/// Runs `ballast run --config CONFIG` as `sh` starts it after `ulimit -v KIB` (no limit
/// for `None`), until it exits or binds its listener: how it went, and its log.
///
/// With one malloc arena: glibc otherwise reserves 64 MiB of address space for each
/// thread that allocates while others do, which depends on timing, so the space a start
/// takes, and so what a limit does, would change from run to run.
#[cfg(target_os = "linux")]
fn run_under_address_space_limit(config: &Path, kib: Option<u64>) -> (Start, String) {
    use std::io::BufRead;
    let script =
        r#"if [ -n "$2" ]; then ulimit -v "$2" || exit 125; fi; exec "$0" run --config "$1""#;
    let limit = kib.map_or_else(String::new, |k| k.to_string());
    let mut child = common::KillOnDrop(
        Command::new("sh")
            .args(["-c", script, BIN, config.to_str().unwrap(), &limit])
            .env("MALLOC_ARENA_MAX", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (line_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "ballast run under ulimit -v {limit} neither exited nor served within 30 s: {log}"
        );
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.contains("listener bound") {
                    // `exec` made the shell ballast: its pid is ballast's.
                    let status =
                        std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
                    let vm_peak_kib = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmPeak:"))
                        .and_then(|v| v.trim().strip_suffix("kB"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or_else(|| panic!("no VmPeak in {status}"));
                    return (Start::Served { vm_peak_kib }, log);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // Its log ended: so did it.
                if let Some(status) = child.0.try_wait().unwrap() {
                    return (Start::Exited(status), log);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
#[cfg(target_os = "linux")]
fn run_exits_2_naming_runtime_threads_when_its_worker_threads_do_not_fit_in_memory() {
    // A thread count `check` accepts on any machine (up to 4 per core).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (4 * cores).min(8);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &format!("[runtime]\nthreads = {threads}\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:1\"\n"),
    );
    let check = ballast(&["check", "--config", config.to_str().unwrap()]);
    assert!(check.status.success(), "{check:?}");

    // Without a limit it serves, taking this much address space.
    let (start, log) = run_under_address_space_limit(&config, None);
    let Start::Served { vm_peak_kib } = start else {
        panic!("ballast run with threads = {threads} did not serve: {log}");
    };
    // At start ballast holds a 2 MiB stack for each worker thread and 4 more, all at
    // once, before it starts serving. Half of those stacks less than what serving took
    // is too little for them and far more than is needed before: a limit there is
    // refused with exit 2. Should this machine need more besides the stacks, go lower,
    // a quarter of the stacks at a time; each try must end in exit 2 or serving, never
    // an abort (134) or a panic (101).
    let stacks_kib = (threads as u64 + 4) * 2048;
    let mut kib = vm_peak_kib - stacks_kib / 2;
    let mut tried = Vec::new();
    for _ in 0..4 {
        let (start, log) = run_under_address_space_limit(&config, Some(kib));
        match start {
            Start::Exited(status) => {
                assert_eq!(
                    status.code(),
                    Some(2),
                    "under ulimit -v {kib} (serving took {vm_peak_kib} KiB): {status}: {log}"
                );
                assert!(
                    log.contains(&format!("runtime.threads = {threads}")),
                    "{log}"
                );
                assert!(!log.contains("panicked"), "{log}");
                return;
            }
            Start::Served { .. } => {
                tried.push(kib);
                kib -= stacks_kib / 4;
            }
        }
    }
    panic!(
        "ballast served under every limit tried ({tried:?} KiB; serving took {vm_peak_kib} KiB)"
    );
}

/// The subcommands a user runs (the packaging helper `manpage` is hidden).
const SUBCOMMANDS: [&str; 5] = ["run", "check", "demo", "status", "completions"];

#[test]
fn help_lists_every_subcommand_with_one_line_each() {
    let out = ballast(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    // One line per subcommand and `help`, none wrapped onto a second line.
    assert_eq!(listed.len(), SUBCOMMANDS.len() + 1, "{help}");
    for name in SUBCOMMANDS {
        let line = listed
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} is not listed: {help}"));
        assert!(
            line.split_whitespace().count() >= 3,
            "{name} has no description: {line}"
        );
    }
    assert!(!help.contains("manpage"), "{help}");
}

#[test]
fn config_has_help_text() {
    for command in ["run", "check"] {
        let out = ballast(&[command, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with("--config <FILE>"))
            .unwrap_or_else(|| panic!("no --config in: {help}"));
        assert!(line.contains("config file"), "{command}: {line}");
    }
}

#[test]
fn completions_for_each_shell_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = ballast(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.len() > 500, "{shell}: {script}");
        for name in SUBCOMMANDS {
            assert!(script.contains(name), "{shell} completion lacks {name}");
        }
        assert!(
            script.contains("config"),
            "{shell} completion lacks --config"
        );
        assert!(
            !script.contains("manpage"),
            "{shell} completes the hidden manpage"
        );
    }
    // The bash script at least parses.
    let bash = ballast(&["completions", "bash"]).stdout;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ballast.bash");
    std::fs::write(&file, bash).unwrap();
    let parsed = Command::new("bash").arg("-n").arg(&file).status().unwrap();
    assert!(parsed.success());
}

#[test]
fn completions_for_an_unknown_shell_exit_1_listing_the_known_ones() {
    let out = ballast(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bash, zsh, fish"), "{stderr}");
}

#[test]
fn the_man_page_describes_every_subcommand() {
    let out = ballast(&["manpage"]);
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH ballast 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    for name in SUBCOMMANDS {
        assert!(
            page.contains(&format!("ballast\\-{name}(1)")),
            "{name}: {page}"
        );
    }
    assert!(
        page.contains(".SH NOTES") && page.contains("SIGHUP"),
        "{page}"
    );
    assert!(
        !page.contains("manpage") && !page.contains("ballast\\-help"),
        "{page}"
    );
}

#[test]
fn manpage_out_dir_writes_a_page_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = ballast(&["manpage", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = std::fs::read_to_string(dir.path().join("ballast.1")).unwrap();
    assert_eq!(top.as_bytes(), ballast(&["manpage"]).stdout);
    for name in SUBCOMMANDS {
        let page = std::fs::read_to_string(dir.path().join(format!("ballast-{name}.1")))
            .unwrap_or_else(|e| panic!("ballast-{name}.1: {e}"));
        assert!(page.contains(&format!(".TH ballast-{name} 1")), "{page}");
    }
    let run = std::fs::read_to_string(dir.path().join("ballast-run.1")).unwrap();
    assert!(run.contains("\\-\\-config"), "{run}");
}
