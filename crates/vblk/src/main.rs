//! `vblk`: the command-line tool.
//!
//! - `vblk serve`: the vhost-user-blk backend daemon (see [`serve`]).

mod serve;
mod size;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vblk", version, about = "virtio-blk over vhost-user: a backend daemon and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a disk image to a VM as a vhost-user-blk device.
    Serve(serve::ServeArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
    };
    if let Err(e) = result {
        eprintln!("vblk: error: {e:#}");
        std::process::exit(1);
    }
}
