//! [`ChainGate`]: which files a qcow2 image may make vblk open.
//!
//! imago opens what an image names (a backing file, an external data file) through an
//! `ImplicitOpenGate`. Its permissive gate opens anything: a qcow2 header naming
//! `/etc/shadow` as its backing file would hand that file's bytes to the guest, and a
//! chain `a -> b -> a` recurses until the stack overflows. A backing file name is data a
//! guest may control (a raw backing file whose contents look like qcow2 is probed as
//! such), so the gate is the security boundary:
//!
//! - every file opened must canonicalise into an allowed directory (the top image's own,
//!   plus `--backing-allowed`);
//! - a format layer already in the chain is refused (a loop);
//! - a chain deeper than [`MAX_CHAIN_DEPTH`] is refused.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use imago::format::gate::ImplicitOpenGate;
use imago::{FormatAccess, FormatDriverBuilder, Storage, StorageOpenOptions};

use super::ordered::OrderedFile;
use super::FormatError;

/// Most images in one chain (the top included). QEMU has no fixed limit; real chains are a
/// handful of snapshots deep.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// A refusal of the gate, carried through imago inside an `io::Error`.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum GateRefusal {
    #[error("{} is outside the directories backing files may come from ({allowed})", path.display())]
    NotAllowed { path: PathBuf, allowed: String },
    #[error("the backing chain loops back to {}", path.display())]
    Loop { path: PathBuf },
    #[error("the backing chain is deeper than {max} images")]
    TooDeep { max: usize },
}

impl GateRefusal {
    pub(crate) fn into_error(self) -> FormatError {
        match self {
            GateRefusal::NotAllowed { path, allowed } => FormatError::NotAllowed { path, allowed },
            GateRefusal::Loop { path } => FormatError::Loop { path },
            GateRefusal::TooDeep { max } => FormatError::TooDeep { max },
        }
    }
}

/// The gate of one chain; see the module docs. Cloned into each layer it opens, with that
/// layer added to the chain.
#[derive(Debug, Clone)]
pub struct ChainGate {
    /// Canonical directories files may come from.
    allowed: Arc<Vec<PathBuf>>,
    /// Canonical paths of the format layers from the top down to the one being opened.
    chain: Vec<PathBuf>,
    /// The first refusal, kept apart because imago wraps the error it travels in.
    refused: Arc<Mutex<Option<GateRefusal>>>,
    /// The layers opened below the top, in the order they were opened (top down).
    opened: Arc<Mutex<Vec<Layer>>>,
}

/// A backing layer the gate let imago open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub path: PathBuf,
    /// imago's name of its format (`qcow2`, `raw`, ...).
    pub format: String,
}

impl ChainGate {
    /// The gate for the image at `top`: files may come from its directory and from `extra`.
    pub fn new(top: &Path, extra: &[PathBuf]) -> io::Result<ChainGate> {
        let top = top.canonicalize()?;
        let mut allowed = vec![top.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf)];
        for dir in extra {
            allowed.push(dir.canonicalize().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?);
        }
        Ok(ChainGate { allowed: Arc::new(allowed), chain: vec![top], refused: Arc::default(), opened: Arc::default() })
    }

    /// Why the gate refused a file, if it did.
    pub(crate) fn refusal(&self) -> Option<GateRefusal> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The backing layers opened so far, top down.
    pub fn opened(&self) -> Vec<Layer> {
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn refuse(&self, r: GateRefusal) -> io::Error {
        let e = io::Error::new(io::ErrorKind::PermissionDenied, r.to_string());
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(r);
        e
    }

    /// The canonical path of `path` if it lies in an allowed directory.
    fn admit(&self, path: &Path) -> io::Result<PathBuf> {
        let canon = path.canonicalize()?;
        if self.allowed.iter().any(|dir| canon.starts_with(dir)) {
            return Ok(canon);
        }
        let allowed = self.allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
        Err(self.refuse(GateRefusal::NotAllowed { path: canon, allowed }))
    }
}

impl ImplicitOpenGate<OrderedFile> for ChainGate {
    fn open_format<F: FormatDriverBuilder<OrderedFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<OrderedFile>> {
        let path = builder
            .get_image_path()
            .ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "a format layer without a file name"))?;
        let canon = self.admit(&path)?;
        if self.chain.contains(&canon) {
            return Err(self.refuse(GateRefusal::Loop { path: canon }));
        }
        if self.chain.len() >= MAX_CHAIN_DEPTH {
            return Err(self.refuse(GateRefusal::TooDeep { max: MAX_CHAIN_DEPTH }));
        }
        let format = format!("{:?}", F::FORMAT).to_lowercase();
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).push(Layer { path: canon.clone(), format });
        let mut below = self.clone();
        below.chain.push(canon);
        Ok(FormatAccess::new(builder.open(below)?))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<OrderedFile> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "a storage object without a file name"))?;
        // Open what was checked, not the name again (a symlink swapped in between).
        let canon = self.admit(path)?;
        OrderedFile::open(opts.filename(canon))
    }
}
