//! `vblk ctl`: manage a running `vblk serve --control PATH` (the client of
//! [`crate::daemon::control`]): list, add, remove, resize and throttle exports, read
//! their counters.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{ArgMatches, Args, Subcommand};
use serde_json::{json, Value};

use crate::daemon::options::{matches_to_object, resolve_paths, ExportArgs};
use crate::daemon::rpc::Client;
use crate::daemon::stats::{buckets, percentile};
use crate::size::{human, parse_size};

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", env = "VBLK_CONTROL", default_value = "vblk.ctl", global = true)]
    pub control: PathBuf,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// List the exports.
    List {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve another disk (takes the options of `vblk serve` for one disk).
    Add(Box<AddArgs>),
    /// Stop serving a disk: its frontend is drained and disconnected, the disk flushed.
    Remove { name: String },
    /// Grow (or, with --allow-shrink, shrink) a disk while it is served; the guest is told.
    Resize {
        name: String,
        /// The new size, e.g. 20G (a multiple of 512 bytes).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Allow a size below the current one (data past it is lost to the guest).
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Counters: requests, bytes, errors, in flight, latency (all exports without NAME).
    Stats {
        name: Option<String>,
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or set an export's limits (0: no limit).
    Qos {
        name: String,
        /// Requests per second.
        #[arg(long)]
        iops: Option<u64>,
        /// Bytes per second, e.g. 100M.
        #[arg(long, value_parser = parse_size)]
        bps: Option<u64>,
        /// How long a burst above the limits may last after idling, in ms.
        #[arg(long)]
        burst_ms: Option<u32>,
    },
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// The export's name.
    #[arg(value_name = "NAME")]
    pub export_name: String,
    #[command(flatten)]
    pub export: ExportArgs,
}

pub fn run(args: CtlArgs, matches: Option<&ArgMatches>) -> Result<()> {
    let mut client = Client::connect(&args.control)?;
    match args.command {
        CtlCommand::List { json } => {
            let list = client.call("export_list", Value::Null)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_list(&list);
            }
        }
        CtlCommand::Add(add) => {
            if add.export.name.is_some() {
                bail!("the name is the first argument (no --name)");
            }
            if add.export.image.is_none() {
                bail!("vblk ctl add NAME IMAGE --socket PATH [options]: the image is missing");
            }
            let mut params = matches.map(matches_to_object).unwrap_or_default();
            resolve_paths(&mut params, Some(&std::env::current_dir()?))?;
            params.insert("name".into(), Value::String(add.export_name.clone()));
            params.remove("export_name");
            let info = client.call("export_add", Value::Object(params))?;
            println!("added {} on {}", add.export_name, info["socket"].as_str().unwrap_or("?"));
        }
        CtlCommand::Remove { name } => {
            client.call("export_remove", json!({"name": name}))?;
            println!("removed {name}");
        }
        CtlCommand::Resize { name, size, allow_shrink } => {
            let r = client.call("export_resize", json!({"name": name, "size": size, "allow_shrink": allow_shrink}))?;
            println!("{name}: {}", human(r["size"].as_u64().unwrap_or(size)));
        }
        CtlCommand::Stats { name, json } => {
            let stats = client.call("export_stats", json!({"name": name}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&stats);
            }
        }
        CtlCommand::Qos { name, iops, bps, burst_ms } => {
            let mut p = json!({"name": name});
            for (k, v) in [("iops", iops), ("bps", bps), ("burst_ms", burst_ms.map(u64::from))] {
                if let Some(v) = v {
                    p[k] = v.into();
                }
            }
            let limits = client.call("export_set_qos", p)?;
            let show = |k: &str, unit: &str| match limits[k].as_u64() {
                Some(v) if v > 0 => format!("{v}{unit}"),
                _ => "unlimited".into(),
            };
            println!(
                "{name}: iops {}, bps {}, burst {} ms",
                show("iops", ""),
                show("bps", " B/s"),
                limits["burst_ms"].as_u64().unwrap_or(0)
            );
        }
    }
    Ok(())
}

fn print_list(list: &Value) {
    let rows = list.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no exports");
        return;
    }
    println!("{:<16} {:>9} {:>6} {:<8} {:<32} IMAGE", "NAME", "SIZE", "QUEUES", "FRONTEND", "SOCKET");
    for e in rows {
        println!(
            "{:<16} {:>9} {:>6} {:<8} {:<32} {}{}",
            e["name"].as_str().unwrap_or("?"),
            human(e["size"].as_u64().unwrap_or(0)),
            e["num_queues"],
            if e["connected"].as_bool() == Some(true) { "attached" } else { "-" },
            e["socket"].as_str().unwrap_or("?"),
            e["image"].as_str().unwrap_or("?"),
            if e["readonly"].as_bool() == Some(true) { " (read-only)" } else { "" },
        );
    }
}

fn us(s: Option<f64>) -> String {
    match s {
        Some(s) => format!("{:.0} µs", s * 1e6),
        None => "-".into(),
    }
}

fn print_stats(stats: &Value) {
    for e in stats["exports"].as_array().into_iter().flatten() {
        let t = &e["total"];
        println!(
            "{} ({} queues, {})",
            e["name"].as_str().unwrap_or("?"),
            e["num_queues"],
            if e["connected"].as_bool() == Some(true) { "frontend attached" } else { "no frontend" }
        );
        println!("  {:<13} {:>12} {:>12}", "op", "requests", "bytes");
        for op in ["read", "write", "flush", "discard", "write-zeroes", "get-id", "other"] {
            let n = t["requests"][op].as_u64().unwrap_or(0);
            if n > 0 || op == "read" || op == "write" {
                println!("  {:<13} {:>12} {:>12}", op, n, human(t["bytes"][op].as_u64().unwrap_or(0)));
            }
        }
        let lat = &t["latency"];
        let b = buckets(lat);
        let count = lat["count"].as_u64().unwrap_or(0);
        let mean = (count > 0).then(|| lat["sum_seconds"].as_f64().unwrap_or(0.0) / count as f64);
        println!(
            "  errors: ioerr {}, unsupp {}; in flight {}; merged {}; refused chains {}; throttled {:.1} s",
            t["errors"]["ioerr"],
            t["errors"]["unsupp"],
            t["in_flight"],
            t["merged"],
            t["refused"],
            t["throttled_seconds"].as_f64().unwrap_or(0.0)
        );
        if stats["timing"].as_bool() == Some(true) {
            println!(
                "  latency: mean {}, p50 <= {}, p99 <= {}",
                us(mean),
                us(percentile(&b, 0.5)),
                us(percentile(&b, 0.99))
            );
        }
    }
}
