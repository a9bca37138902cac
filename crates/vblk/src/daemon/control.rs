//! The control socket (`vblk serve --control PATH`): JSON-RPC 2.0, one request per line,
//! one response line each, in order. Each connection has its own thread, so a slow call
//! (removing an export drains it) or a `vblk top` that stays connected holds up no one
//! else. The socket file gets mode 0600: whoever may connect may add, remove and resize
//! exports.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use vblk_vhost_user::DeviceError;

use vblk_vhost_user::claim_socket_path;

use super::export::qos_json;
use super::options::{resolve_paths, ExportArgs};
use super::rpc::{self, Request, Response, RpcError};
use super::Daemon;
use crate::size::parse_size;

/// The listening control socket; dropping it stops accepting and removes the file.
pub struct ControlServer {
    path: PathBuf,
    stop: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(path: &Path, daemon: Arc<Daemon>) -> Result<ControlServer> {
        claim_socket_path(path).map_err(|e| anyhow::anyhow!("control {e}"))?;
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot listen on control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("control socket {}", path.display()))?;
        let (stop_rx, stop) = UnixStream::pair().context("socketpair")?;
        let thread = std::thread::Builder::new()
            .name("vblk-control".into())
            .spawn(move || accept_loop(listener, stop_rx, daemon))
            .context("cannot start the control thread")?;
        Ok(ControlServer { path: path.to_owned(), stop, thread: Some(thread) })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = (&self.stop).write_all(b"s");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, stop: UnixStream, daemon: Arc<Daemon>) {
    loop {
        let mut fds = [
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %std::io::Error::last_os_error(), "control socket: poll failed");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((conn, _)) => {
                let daemon = Arc::clone(&daemon);
                let spawned =
                    std::thread::Builder::new().name("vblk-ctl-conn".into()).spawn(move || serve(conn, &daemon));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "control socket: cannot start a connection thread");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Answer one connection's requests until it closes.
fn serve(conn: UnixStream, daemon: &Daemon) {
    let Ok(mut writer) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(rpc::MAX_LINE as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > rpc::MAX_LINE {
            let e = RpcError::new(rpc::INVALID_REQUEST, format!("request longer than {} bytes", rpc::MAX_LINE));
            let _ = respond(&mut writer, Value::Null, Err(e));
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (id, result) = match serde_json::from_slice::<Value>(&line) {
            Err(e) => (Value::Null, Err(RpcError::new(rpc::PARSE_ERROR, format!("not JSON: {e}")))),
            Ok(v) => {
                let id = v.get("id").cloned().unwrap_or(Value::Null);
                match serde_json::from_value::<Request>(v) {
                    Ok(req) if req.jsonrpc == "2.0" => (id, call(daemon, &req.method, req.params)),
                    Ok(_) => (id, Err(RpcError::new(rpc::INVALID_REQUEST, "jsonrpc must be \"2.0\""))),
                    Err(e) => (id, Err(RpcError::new(rpc::INVALID_REQUEST, format!("not a JSON-RPC request: {e}")))),
                }
            }
        };
        if respond(&mut writer, id, result).is_err() {
            return;
        }
    }
}

fn respond(w: &mut UnixStream, id: Value, result: Result<Value, RpcError>) -> std::io::Result<()> {
    let (result, error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    let mut out = serde_json::to_vec(&Response { jsonrpc: "2.0".into(), result, error, id })?;
    out.push(b'\n');
    w.write_all(&out)
}

/// The params object, or an error naming what is wrong with it.
fn params(p: Value) -> Result<Map<String, Value>, RpcError> {
    match p {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        _ => Err(RpcError::new(rpc::INVALID_PARAMS, "params must be an object")),
    }
}

fn name_param(p: &Map<String, Value>) -> Result<String, RpcError> {
    match p.get("name") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(RpcError::new(rpc::INVALID_PARAMS, "'name' must be a string")),
        None => Err(RpcError::new(rpc::INVALID_PARAMS, "missing 'name'")),
    }
}

/// An optional non-negative integer param (a size string such as "100M" is accepted too).
fn number_param(p: &Map<String, Value>, key: &str) -> Result<Option<u64>, RpcError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| RpcError::new(rpc::INVALID_PARAMS, format!("'{key}' must be a non-negative integer"))),
        Some(Value::String(s)) => {
            parse_size(s).map(Some).map_err(|e| RpcError::new(rpc::INVALID_PARAMS, format!("'{key}': {e}")))
        }
        Some(_) => Err(RpcError::new(rpc::INVALID_PARAMS, format!("'{key}' must be a number"))),
    }
}

/// Refuse params this method does not know (a typo must not pass silently).
fn only(p: &Map<String, Value>, known: &[&str]) -> Result<(), RpcError> {
    match p.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(RpcError::new(rpc::INVALID_PARAMS, format!("unknown param '{k}'"))),
        None => Ok(()),
    }
}

/// Run one method.
pub fn call(daemon: &Daemon, method: &str, p: Value) -> Result<Value, RpcError> {
    let p = params(p)?;
    match method {
        "export_add" => {
            let mut p = p;
            resolve_paths(&mut p, None).map_err(RpcError::invalid_params)?;
            let args = ExportArgs::from_object(&p).map_err(RpcError::invalid_params)?;
            let e = daemon.add(&args, p)?;
            Ok(e.info())
        }
        "export_remove" => {
            only(&p, &["name"])?;
            daemon.remove(&name_param(&p)?)?;
            Ok(json!(true))
        }
        "export_list" => {
            only(&p, &[])?;
            Ok(daemon.list())
        }
        "export_stats" => {
            only(&p, &["name"])?;
            let name = match p.get("name") {
                None | Some(Value::Null) => None,
                Some(_) => Some(name_param(&p)?),
            };
            daemon.stats(name.as_deref())
        }
        "export_resize" => {
            only(&p, &["name", "size", "allow_shrink"])?;
            let name = name_param(&p)?;
            // Bytes, or a size with a suffix ("40G").
            let size = number_param(&p, "size")?.ok_or_else(|| RpcError::new(rpc::INVALID_PARAMS, "missing 'size'"))?;
            let allow_shrink = match p.get("allow_shrink") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(RpcError::new(rpc::INVALID_PARAMS, "'allow_shrink' must be true or false")),
            };
            let size = daemon.get(&name)?.resize(size, allow_shrink).map_err(|e| resize_error(&name, e))?;
            Ok(json!({"name": name, "size": size}))
        }
        "export_set_qos" => {
            only(&p, &["name", "iops", "bps", "burst_ms"])?;
            let export = daemon.get(&name_param(&p)?)?;
            let mut limits = export.throttle().limits();
            // An absent key keeps its limit; 0 lifts it.
            if let Some(v) = number_param(&p, "iops")? {
                limits.iops = Some(v).filter(|&v| v > 0);
            }
            if let Some(v) = number_param(&p, "bps")? {
                limits.bps = Some(v).filter(|&v| v > 0);
            }
            if let Some(v) = number_param(&p, "burst_ms")? {
                limits.burst_ms = u32::try_from(v)
                    .ok()
                    .filter(|&ms| ms <= 60_000)
                    .ok_or_else(|| RpcError::new(rpc::INVALID_PARAMS, "'burst_ms' must be at most 60000"))?;
            }
            export.throttle().set_limits(limits);
            tracing::info!(export = %export.name(), limits = %export.throttle().limits(), "QoS limits set");
            Ok(qos_json(&export.throttle().limits()))
        }
        _ => Err(RpcError::new(rpc::METHOD_NOT_FOUND, format!("no method '{method}'"))),
    }
}

/// A refused or failed resize as the caller should read it.
fn resize_error(name: &str, e: DeviceError) -> RpcError {
    match e {
        DeviceError::ShrinkRefused { current, requested } => RpcError::failed(format!(
            "{name}: {requested} bytes is smaller than the disk ({current} bytes): the guest would lose the data \
             past the new end; shrink only with allow_shrink (vblk ctl resize --allow-shrink)"
        )),
        DeviceError::Backend(b @ vblk_backend::BackendError::BadSize { .. }) => RpcError::invalid_params(b),
        e => RpcError::failed(format!("{name}: resize failed: {e}")),
    }
}
