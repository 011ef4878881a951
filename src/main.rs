//! The `ballast` command: parses the command line, sets up logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use ballast::config::Config;

/// `eprintln!` that never panics: stderr may be gone (a closed terminal).
macro_rules! report {
    ($($arg:tt)*) => {
        ballast::logging::eprint_line(&format!($($arg)*))
    };
}

#[derive(Parser, Debug)]
#[command(
    name = "ballast",
    version,
    about = "A layer-4 TCP/WebSocket load balancer"
)]
struct Cli {
    /// error | warn | info | debug | trace (RUST_LOG, when set, takes precedence)
    #[arg(long, global = true, default_value = "info")]
    log_level: LogLevel,
    /// text | json
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, default_value = "conf/ballast.toml")]
        config: PathBuf,
    },
    /// Validate a config file as `run` would, without binding anything.
    Check {
        #[arg(long, default_value = "conf/ballast.toml")]
        config: PathBuf,
    },
    /// Three demo backends behind ballast on loopback, and a guide of what to try.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: std::net::SocketAddr,
    },
    /// Show listeners and backends of a running ballast (read from its admin endpoint).
    Status {
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: std::net::SocketAddr,
    },
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
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
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report!("error: {e}");
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
            Ok(status) => {
                print!("{}", ballast::status::render(&status));
                ExitCode::SUCCESS
            }
            Err(e) => {
                report!("error: {e}");
                ExitCode::from(EXIT_START_FAILURE)
            }
        },
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(e) => {
                    report!("error: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let bound = match ballast::bind(&config) {
                Ok(bound) => bound,
                Err(e) => {
                    report!("error: {e}");
                    return ExitCode::from(EXIT_START_FAILURE);
                }
            };
            // Listeners say so when their accept loop starts (also after a reload).
            if let Some(addr) = bound.admin.as_ref().and_then(|s| s.local_addr().ok()) {
                tracing::info!(%addr, "admin bound");
            }
            if ballast::shell::run(config, path, bound) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_START_FAILURE)
            }
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

