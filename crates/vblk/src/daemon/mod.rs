//! The daemon: the exports one `vblk serve` process holds, and what the control socket
//! can do with them.
//!
//! - [`options`]: one export's options, shared by the command line, the config file and
//!   `export_add`.
//! - [`open`]: opening an export's disk.
//! - [`export`]: one export running (its socket, thread and workers).
//! - [`config`]: the `--config` TOML file.
//! - [`control`]: the `--control` socket, JSON-RPC 2.0 ([`rpc`] holds the wire types,
//!   shared with `vblk ctl` and `vblk top`).
//! - [`stats`]: counters as JSON.

pub mod config;
pub mod control;
pub mod export;
pub mod open;
pub mod options;
pub mod rpc;
pub mod stats;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{json, Map, Value};
use vblk_metrics::Registry;

use self::export::Export;
use self::options::ExportArgs;
use self::rpc::RpcError;

/// An error and its causes on one line, each thing said once: a cause whose text its
/// context already quotes (`cannot open X: No such file...` over `No such file...`) is
/// left out.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Every export of the process, by name.
pub struct Daemon {
    exports: Mutex<Exports>,
    registry: Arc<Registry>,
    /// Measure latencies (someone can read them: `--metrics` or `--control`).
    timing: bool,
    started: Instant,
}

#[derive(Default)]
struct Exports {
    running: BTreeMap<String, Arc<Export>>,
    /// Names being added (the disk is opening, outside the lock): taken.
    starting: BTreeSet<String>,
}

impl Daemon {
    pub fn new(registry: Arc<Registry>, timing: bool) -> Self {
        Daemon { exports: Mutex::default(), registry, timing, started: Instant::now() }
    }

    fn lock(&self) -> MutexGuard<'_, Exports> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start an export. `options` is what the caller gave (kept for `export_list`).
    pub fn add(&self, args: &ExportArgs, options: Map<String, Value>) -> Result<Arc<Export>, RpcError> {
        let name = args.export_name().map_err(RpcError::invalid_params)?;
        {
            let mut ex = self.lock();
            if ex.running.contains_key(&name) || !ex.starting.insert(name.clone()) {
                return Err(RpcError::exists(&name));
            }
        }
        // Opening may take long (an RBD cluster, a qcow2 chain): other calls go on meanwhile.
        let started = Export::start(name.clone(), args, options, self.timing);
        let mut ex = self.lock();
        ex.starting.remove(&name);
        let export = Arc::new(started.map_err(|e| RpcError::failed(error_text(&e)))?);
        if let Err(e) = self.registry.register(&name, Arc::clone(export.metrics())) {
            // Not reachable while names are unique here; stop it rather than serve it unseen.
            drop(ex);
            let _ = export.stop();
            return Err(RpcError::failed(format!("export {name}: {e}")));
        }
        ex.running.insert(name.clone(), Arc::clone(&export));
        let (q, t) = (export.num_queues(), export.threads());
        eprintln!(
            "vblk: serving {} as '{name}' on {} ({q} queue{}, {t} thread{}{})",
            export.describe(),
            export.socket().display(),
            if q == 1 { "" } else { "s" },
            if t == 1 { "" } else { "s" },
            if export.readonly() { ", read-only" } else { "" },
        );
        if export.throttle().is_limited() {
            eprintln!("vblk: '{name}': QoS limits: {}", export.throttle().limits());
        }
        Ok(export)
    }

    /// Stop an export and forget it: its frontend (if any) is drained and disconnected.
    pub fn remove(&self, name: &str) -> Result<(), RpcError> {
        let export = self.lock().running.remove(name).ok_or_else(|| RpcError::no_export(name))?;
        self.registry.unregister(name);
        export.stop().map_err(|e| RpcError::failed(error_text(&e)))?;
        eprintln!("vblk: export '{name}' removed");
        Ok(())
    }

    /// Stop every export (at shutdown), each in its own thread: one slow flush does not
    /// hold up the others.
    pub fn remove_all(&self) -> Vec<(String, RpcError)> {
        let names: Vec<String> = self.lock().running.keys().cloned().collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = names.iter().map(|n| (n, s.spawn(|| self.remove(n)))).collect();
            handles
                .into_iter()
                .filter_map(|(n, h)| match h.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some((n.clone(), e)),
                    Err(_) => Some((n.clone(), RpcError::failed("panicked while stopping".into()))),
                })
                .collect()
        })
    }

    pub fn get(&self, name: &str) -> Result<Arc<Export>, RpcError> {
        self.lock().running.get(name).cloned().ok_or_else(|| RpcError::no_export(name))
    }

    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.lock().running.values().cloned().collect()
    }

    pub fn list(&self) -> Value {
        Value::Array(self.exports().iter().map(|e| e.info()).collect())
    }

    /// Counters of one export, or of all.
    pub fn stats(&self, name: Option<&str>) -> Result<Value, RpcError> {
        let exports = match name {
            Some(n) => vec![self.get(n)?],
            None => self.exports(),
        };
        Ok(json!({
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "timing": self.timing,
            "exports": exports.iter().map(|e| stats::export_json(e)).collect::<Vec<_>>(),
        }))
    }
}
