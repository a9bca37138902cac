//! The control socket's wire format: JSON-RPC 2.0, one request or response per line (as
//! SPDK's RPC socket). Shared by the server ([`super::control`]) and its clients
//! (`vblk ctl`, `vblk top`).
//!
//! Methods: `export_add`, `export_remove`, `export_list`, `export_resize`,
//! `export_stats`, `export_set_qos` (params in ARCHITECTURE.md and README.md).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request line the server reads.
pub const MAX_LINE: usize = 1 << 20;

/// JSON-RPC's own error codes.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// vblk's: the named export does not exist.
pub const NO_SUCH_EXPORT: i64 = -32001;
/// vblk's: an export of that name exists (or is being added).
pub const EXPORT_EXISTS: i64 = -32002;
/// vblk's: the operation failed (the message says why).
pub const FAILED: i64 = -32000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
    }
    pub fn invalid_params(e: impl std::fmt::Display) -> Self {
        Self::new(INVALID_PARAMS, format!("{e:#}"))
    }
    pub fn failed(message: String) -> Self {
        Self::new(FAILED, message)
    }
    pub fn no_export(name: &str) -> Self {
        Self::new(NO_SUCH_EXPORT, format!("no export named '{name}'"))
    }
    pub fn exists(name: &str) -> Self {
        Self::new(EXPORT_EXISTS, format!("an export named '{name}' exists"))
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub jsonrpc: String,
    pub method: String,
    #[serde(default)]
    pub params: Value,
    #[serde(default)]
    pub id: Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<RpcError>,
    pub id: Value,
}

/// Errors of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the control socket {path}: {source} (is `vblk serve --control {path}` running?)")]
    Connect { path: String, source: std::io::Error },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket: bad response: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Rpc(RpcError),
}

/// A connection to a daemon's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        let writer = stream.try_clone()?;
        Ok(Client { reader: BufReader::new(stream), writer, next_id: 1 })
    }

    /// Call `method` and wait for its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request { jsonrpc: "2.0".into(), method: method.into(), params, id: id.into() };
        let mut line = serde_json::to_vec(&req).map_err(|e| ClientError::BadResponse(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(ClientError::BadResponse("the daemon closed the connection".into()));
        }
        let resp: Response = serde_json::from_str(&answer).map_err(|e| ClientError::BadResponse(e.to_string()))?;
        if resp.id != id {
            return Err(ClientError::BadResponse(format!("id {} for request {id}", resp.id)));
        }
        match (resp.result, resp.error) {
            (_, Some(e)) => Err(ClientError::Rpc(e)),
            (Some(r), None) => Ok(r),
            (None, None) => Err(ClientError::BadResponse("neither result nor error".into())),
        }
    }
}
