//! The `ballast` command: parses the command line, sets up logging, calls the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use ballast::config::Config;

/// `eprintln!` that never panics: stderr may be gone (a closed terminal).
macro_rules! report {
    ($($arg:tt)*) => {
        ballast::logging::eprint_line(&format!($($arg)*))
    };
}

/// The end of `--help` and the man page: what an operator looks up besides the flags.
const AFTER_HELP: &str = "\
Signals (run): SIGHUP reloads the config (an invalid file is refused, the old config
keeps serving); SIGTERM or SIGINT stop gracefully, and a second one during that closes
every connection at once; SIGQUIT hands the listening sockets and the established
connections to a `ballast run --upgrade` waiting on runtime.upgrade_sock, then exits;
SIGUSR2 starts that new process itself (the binary at the path this one was started
from, with the same arguments) and does the same: the way to upgrade under systemd.

Exit codes: 0 clean shutdown, 1 bad config or usage, 2 a failure at start.

Files: /etc/ballast/ballast.toml is the config of the packaged systemd service
(ballast.service).";

#[derive(Parser, Debug)]
#[command(
    name = "ballast",
    version,
    about = "A layer-4 TCP/WebSocket load balancer",
    after_long_help = AFTER_HELP
)]
struct Cli {
    /// How much to log (RUST_LOG, when set, takes precedence)
    #[arg(long, global = true, default_value = "info")]
    log_level: LogLevel,
    /// Log lines as text or as one JSON object each
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run {
        /// The config file (TOML; conf/ballast.toml describes every key)
        #[arg(long, value_name = "FILE", default_value = "conf/ballast.toml")]
        config: PathBuf,
        /// Take over the listening sockets of the running ballast: wait for them on
        /// runtime.upgrade_sock, then send the running one SIGQUIT
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file as `run` would, without binding anything.
    Check {
        /// The config file to validate
        #[arg(long, value_name = "FILE", default_value = "conf/ballast.toml")]
        config: PathBuf,
    },
    /// Three demo backends behind ballast on loopback, and a guide of what to try.
    Demo {
        /// Where the demo listener accepts clients
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Where the demo's admin endpoint listens
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: std::net::SocketAddr,
    },
    /// Show listeners and backends of a running ballast (read from its admin endpoint).
    Status {
        /// The admin endpoint of the running ballast
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: std::net::SocketAddr,
    },
    /// Print a shell completion script (bash, zsh or fish).
    Completions {
        /// The shell to complete for
        shell: CompletionShell,
    },
}

/// What the command line asks for: a user's command, or the packaging helper.
enum Invocation {
    Cli(Cli),
    /// `ballast manpage [--out-dir DIR]`
    Manpage(Option<PathBuf>),
}

/// `ballast manpage`, hidden and kept out of [`Cli`]: the completions and the man page,
/// made from `Cli`, then list only what a user runs (clap_complete lists hidden
/// subcommands too).
fn manpage_command() -> clap::Command {
    clap::Command::new("manpage")
        .about("Print the man page (packaging uses it; `man ballast` reads it once installed)")
        .hide(true)
        .arg(
            clap::Arg::new("out_dir")
                .long("out-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Write a page per command (ballast.1, ballast-run.1, ...) into DIR instead"),
        )
}

fn parse() -> Result<Invocation, clap::Error> {
    let matches = Cli::command()
        .subcommand(manpage_command())
        .try_get_matches()?;
    match matches.subcommand() {
        Some(("manpage", m)) => Ok(Invocation::Manpage(
            m.get_one::<PathBuf>("out_dir").cloned(),
        )),
        _ => Cli::from_arg_matches(&matches).map(Invocation::Cli),
    }
}

/// The shells `ballast completions` writes for.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Exit codes of the user-facing contract.
const EXIT_BAD_CONFIG: u8 = 1;
const EXIT_START_FAILURE: u8 = 2;

fn main() -> ExitCode {
    let code = run();
    // The log lines still queued go out before the process does.
    ballast::logging::flush(ballast::logging::FLUSH_WAIT);
    code
}

fn run() -> ExitCode {
    let cli = match parse() {
        Ok(Invocation::Cli(cli)) => cli,
        Ok(Invocation::Manpage(out_dir)) => return manpage(out_dir),
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_level, cli.log_format);
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                // The verdict is the exit code; a closed stdout does not change it.
                let _ = writeln!(std::io::stdout(), "ok");
                ExitCode::SUCCESS
            }
            // One `FILE:LINE:COL: message` line per problem, as compilers print them.
            Err(e) => {
                report!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Demo { listen, admin } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    report!("error: cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_START_FAILURE);
                }
            };
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            match runtime.block_on(async {
                tokio::select! {
                    result = ballast::demo::run(listen, admin, stop) => result,
                    _ = terminated() => Ok(()),
                }
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ ballast::StartError::Config(_)) => {
                    report!("error: {e}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
                Err(e) => {
                    report!("error: {e}");
                    ExitCode::from(EXIT_START_FAILURE)
                }
            }
        }
        Command::Status { admin } => match ballast::status::fetch(admin) {
            Ok(status) => print_bytes(ballast::status::render(&status).as_bytes()),
            Err(e) => {
                report!("error: {e}");
                ExitCode::from(EXIT_START_FAILURE)
            }
        },
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ballast", &mut script);
            print_bytes(&script)
        }
        Command::Run {
            config: path,
            upgrade,
        } => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(e) => {
                    report!("{e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let bound = if upgrade {
                ballast::upgrade::take_over(&config).map_err(|e| e.to_string())
            } else {
                ballast::bind(&config).map_err(|e| e.to_string())
            };
            let bound = match bound {
                Ok(bound) => bound,
                Err(e) => {
                    report!("error: {e}");
                    return ExitCode::from(EXIT_START_FAILURE);
                }
            };
            // The accept loops and the admin endpoint log their address when they start.
            if ballast::shell::run(config, path, bound, upgrade) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_START_FAILURE)
            }
        }
    }
}

/// Prints `ballast(1)`, or writes it and a page per subcommand into `out_dir`.
fn manpage(out_dir: Option<PathBuf>) -> ExitCode {
    let Some(dir) = out_dir else {
        return match man_page() {
            Ok(page) => print_bytes(&page),
            Err(e) => {
                report!("error: cannot render the man page: {e}");
                ExitCode::from(EXIT_START_FAILURE)
            }
        };
    };
    // A page per subcommand, then ballast.1 again with its NOTES heading.
    let written = clap_mangen::generate_to(Cli::command(), &dir)
        .and_then(|()| man_page())
        .and_then(|page| std::fs::write(dir.join("ballast.1"), page));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report!("error: {}: cannot write the man pages: {e}", dir.display());
            ExitCode::from(EXIT_START_FAILURE)
        }
    }
}

/// `ballast(1)`, from the same definition as `--help`. clap_mangen puts the text after
/// the options under a heading of its own, EXTRA; man pages call that NOTES.
fn man_page() -> std::io::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command().disable_help_subcommand(true)).render(&mut page)?;
    let page = String::from_utf8_lossy(&page).replace("\n.SH EXTRA\n", "\n.SH NOTES\n");
    Ok(page.into_bytes())
}

/// Writes generated text to stdout; a closed stdout (`| head`) is an error, not a panic.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report!("error: cannot write to stdout: {e}");
            ExitCode::from(EXIT_START_FAILURE)
        }
    }
}

/// Resolves on SIGTERM (the demo ends on it as on Ctrl-C).
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn init_logging(level: LogLevel, format: LogFormat) {
    use ballast::logging::{Format, Level};
    let level = match level {
        LogLevel::Error => Level::Error,
        LogLevel::Warn => Level::Warn,
        LogLevel::Info => Level::Info,
        LogLevel::Debug => Level::Debug,
        LogLevel::Trace => Level::Trace,
    };
    let format = match format {
        LogFormat::Text => Format::Text,
        LogFormat::Json => Format::Json,
    };
    ballast::logging::init(level, format);
}
