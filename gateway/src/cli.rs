//! The `trio-gateway` command line. Logs go to stderr; stdout carries only a command's output.
//!
//! It lives in the library so that other binaries (the benchmark, the fault-injection tests'
//! gateway process) run exactly the same `serve` as the shipped one.

use crate::{Config, dlq, init_logging, serve};
use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use trio_pseudo::{CacheConfig, LocalPseudonymiser, PseudoDomain, Pseudonymiser};

/// The TRIO gateway: RabbitMQ in, PostgreSQL state, RabbitMQ out. Configured by TRIO_* variables
/// (see README).
#[derive(Parser)]
#[command(name = "trio-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, declare the topology and process messages until SIGTERM/SIGINT.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run a short scenario end to end on the configured broker and database, and print it.
    Demo,
    /// Write a new local pseudonymisation domain file (keep it secret).
    PseudoKeygen {
        /// Where to write it (stdout when absent).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Domain name.
        #[arg(long, default_value = "trio")]
        domain: String,
        /// Audience written into transitInfo.
        #[arg(long, default_value = "urn:be:trio:gateway:pseudo:trio")]
        audience: String,
    },
    /// Inspect or replay the dead-letter queue trio.dead.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters: type, sender, error and time (no payload contents).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Put dead letters back on their inbound queue (needs a broker user with the impersonator tag,
    /// and the database: what an already committed letter caused goes to the outbox first).
    Replay {
        /// The message_id of the letter(s) to replay.
        #[arg(long, conflicts_with = "all")]
        id: Option<String>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
}

fn load_pseudonymiser(config: &Config) -> anyhow::Result<Arc<dyn Pseudonymiser>> {
    let Some(path) = &config.pseudo_domain_file else {
        bail!(
            "TRIO_PSEUDO_DOMAIN_FILE is not set: create one with `trio-gateway pseudo-keygen --out FILE`"
        );
    };
    let domain = PseudoDomain::load(path)
        .with_context(|| format!("loading the pseudonymisation domain {}", path.display()))?;
    Ok(Arc::new(LocalPseudonymiser::new(
        domain,
        CacheConfig::default(),
    )))
}

/// Runs the command line with the process arguments.
///
/// # Errors
/// Whatever the chosen command fails with.
pub fn main() -> anyhow::Result<()> {
    run(std::env::args_os())
}

/// Runs the command line with these arguments (the first one is the program name).
///
/// # Errors
/// Whatever the chosen command fails with.
#[tokio::main]
pub async fn run<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    init_logging();
    let cli = Cli::parse_from(args);
    let config = Config::from_env()?;
    match cli.command {
        Command::Serve => {
            let pseudonymiser = load_pseudonymiser(&config)?;
            serve::serve(config, pseudonymiser, serve::termination_signal()).await
        }
        Command::Migrate => {
            serve::ensure_database(&config).await?;
            let db = serve::connect_db(&config, Some(std::time::Duration::from_secs(30))).await?;
            serve::migrate(&db).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Demo => {
            let pseudonymiser = match &config.pseudo_domain_file {
                Some(_) => load_pseudonymiser(&config)?,
                None => {
                    eprintln!(
                        "demo: TRIO_PSEUDO_DOMAIN_FILE is not set; using a throw-away domain key"
                    );
                    Arc::new(LocalPseudonymiser::new(
                        PseudoDomain::generate("trio-demo", "urn:be:trio:gateway:pseudo:demo"),
                        CacheConfig::default(),
                    ))
                }
            };
            let db_config = config.clone();
            serve::ensure_database(&db_config).await?;
            let mut stdout = std::io::stdout();
            crate::demo::run(config, pseudonymiser, &mut stdout).await
        }
        Command::PseudoKeygen {
            out,
            domain,
            audience,
        } => {
            let json = PseudoDomain::generate(&domain, &audience).to_json();
            match out {
                Some(path) => {
                    write_secret(&path, &json)?;
                    eprintln!("wrote {}", path.display());
                }
                None => println!("{json}"),
            }
            Ok(())
        }
        Command::Dlq { command } => match command {
            DlqCommand::List { limit } => {
                let letters = dlq::list(&config, limit).await?;
                dlq::print(&letters, &mut std::io::stdout())?;
                Ok(())
            }
            DlqCommand::Replay { id, all } => {
                let selection = match (id, all) {
                    (Some(id), false) => dlq::Selection::Id(id),
                    (None, true) => dlq::Selection::All,
                    _ => bail!("say which: --id MESSAGE_ID or --all"),
                };
                let n = dlq::replay(&config, &selection).await?;
                println!("replayed {n} dead letter(s)");
                Ok(())
            }
        },
    }
}

/// Writes a file readable by its owner only (a pseudonymisation domain: it holds the key).
///
/// # Errors
/// When the file cannot be written.
pub fn write_secret(path: &std::path::Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(content.as_bytes())?;
    Ok(())
}
