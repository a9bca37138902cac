//! `vblk`: the command-line tool.
//!
//! - `vblk serve`: the vhost-user-blk backend daemon (see [`serve`]).
//! - `vblk info | bench | verify | io`: the driver side, against any vhost-user-blk backend
//!   (`--socket`) or vblk's device engine in this process (`--loopback`): see [`target`].

mod bench;
mod ctl;
mod daemon;
mod info;
mod io;
mod rng;
mod serve;
mod size;
mod target;
mod top;
mod verify;

use std::io::IsTerminal;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vblk", version, about = "virtio-blk over vhost-user: a backend daemon and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Serve disk images to VMs as vhost-user-blk devices.
    Serve(serve::ServeArgs),
    /// Manage a running `vblk serve --control PATH`: list, add, remove, resize, stats, qos.
    Ctl(ctl::CtlArgs),
    /// A live view of a running `vblk serve --control PATH`: IOPS, bandwidth, latency per export and queue.
    Top(top::TopArgs),
    /// Show what a vhost-user-blk backend offers: capacity, features, limits.
    Info(info::InfoArgs),
    /// Measure IOPS, bandwidth, latency and CPU cost per I/O.
    Bench(bench::BenchArgs),
    /// Check data integrity with a random workload against an in-memory model
    /// (overwrites the region it tests).
    Verify(verify::VerifyArgs),
    /// One dd-like read or write.
    #[command(subcommand)]
    Io(io::IoCommand),
}

fn main() {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The daemon logs its life; the tools only warnings (unless RUST_LOG says otherwise).
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Ctl(args) => {
            // `ctl add` forwards the options given on its command line (not the defaults).
            let add = matches.subcommand_matches("ctl").and_then(|m| m.subcommand_matches("add"));
            ctl::run(args, add)
        }
        Command::Top(args) => top::run(args),
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Io(cmd) => io::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("vblk: error: {}", daemon::error_text(&e));
        std::process::exit(1);
    }
}
