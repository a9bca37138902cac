//! Opening (or creating) an export's disk from its options: a raw file or block device, a
//! qcow2 chain, a Ceph RBD image or the null backend, with fault injection on top if asked.

use anyhow::{bail, Context, Result};
use vblk_backend::qcow2::{check_header, has_qcow2_magic, CreateOptions, Qcow2Image, Qcow2Options};
use vblk_backend::rbd::{RbdOptions, RbdSpec};
use vblk_backend::RbdError;
use vblk_backend::{Disk, DiskOptions};

use super::options::{BackendKind, ExportArgs, FormatArg};
use crate::size::human;

const DEFAULT_SIZE: u64 = 1 << 30;

pub fn open_disk(args: &ExportArgs) -> Result<Disk> {
    let disk = open_backend(args)?;
    Ok(match &args.inject {
        Some(spec) => {
            tracing::warn!(%spec, "FAULT INJECTION ON (--inject, a testing aid): I/O will fail on purpose");
            disk.with_faults(spec.clone())
        }
        None => disk,
    })
}

fn open_backend(args: &ExportArgs) -> Result<Disk> {
    let image = args.image_path();
    if args.backend == BackendKind::Null {
        return Ok(Disk::null(args.size.unwrap_or(DEFAULT_SIZE)));
    }
    if let Some(spec) = RbdSpec::parse(&image.to_string_lossy()) {
        return open_rbd(args, spec.map_err(anyhow::Error::msg)?);
    }
    if args.ceph_conf.is_some() || args.ceph_id.is_some() {
        bail!("--ceph-conf and --ceph-id apply to RBD images (rbd:POOL/IMAGE)");
    }
    let exists = image.exists();
    if args.format == Some(FormatArg::Qcow2) {
        return open_qcow2(args, exists);
    }
    if args.backing.is_some() {
        bail!("--backing applies to qcow2 images: add --format qcow2");
    }
    if exists && args.format.is_none() && has_qcow2_magic(image).unwrap_or(false) {
        bail!(
            "{} has a qcow2 header: serve it with --format qcow2, or with --format raw if it is a raw disk \
             (vblk never guesses: a guest can write any header into a raw disk)",
            image.display()
        );
    }
    if !exists && args.readonly {
        bail!("image {} does not exist (a read-only export cannot create it)", image.display());
    }
    if let Some(size) = args.size {
        if size == 0 || size % 512 != 0 {
            bail!("--size must be a non-zero multiple of 512 bytes (got {size})");
        }
    }
    if exists && args.size.is_some() {
        tracing::warn!("{} exists; --size only applies to new images", image.display());
    }
    let opts = DiskOptions {
        readonly: args.readonly,
        direct: !args.no_direct,
        create_size: if exists { None } else { Some(args.size.unwrap_or(DEFAULT_SIZE)) },
    };
    let disk = Disk::open(image, &opts)?;
    if disk.size() < 512 {
        bail!("image {} is smaller than one sector", image.display());
    }
    if !exists {
        eprintln!("vblk: created {} ({}, sparse)", image.display(), human(disk.size()));
    }
    Ok(disk)
}

fn open_qcow2(args: &ExportArgs, exists: bool) -> Result<Disk> {
    let path = args.image_path();
    if !exists {
        if args.readonly {
            bail!("image {} does not exist (a read-only export cannot create it)", path.display());
        }
        // Without --size, an overlay is as large as its backing file (as with qemu-img).
        let size = match (args.size, &args.backing) {
            (Some(size), _) => size,
            (None, Some(b)) if has_qcow2_magic(b).unwrap_or(false) => check_header(b)?.size,
            (None, Some(b)) => std::fs::metadata(b).with_context(|| format!("backing file {}", b.display()))?.len(),
            (None, None) => DEFAULT_SIZE,
        };
        if size == 0 || !size.is_multiple_of(512) {
            bail!("--size must be a non-zero multiple of 512 bytes (got {size})");
        }
        let cs = args.cluster_size;
        if !cs.is_power_of_two() || !(4096..=2 << 20).contains(&cs) {
            bail!("--cluster-size must be a power of two from 4K to 2M (got {cs})");
        }
        let create = CreateOptions { size, backing: args.backing.clone(), cluster_size: cs as u32 };
        Qcow2Image::create(path, &create)?;
        eprintln!(
            "vblk: created {} (qcow2, {}{})",
            path.display(),
            human(size),
            match &args.backing {
                Some(b) => format!(", backing file {}", b.display()),
                None => String::new(),
            }
        );
    } else if args.backing.is_some() {
        bail!("{} exists: --backing only applies to a new image", path.display());
    }
    let opts = Qcow2Options { readonly: args.readonly, backing_allowed: args.backing_allowed.clone() };
    Ok(Disk::open_qcow2(path, &opts)?)
}

fn open_rbd(args: &ExportArgs, spec: RbdSpec) -> Result<Disk> {
    if args.format == Some(FormatArg::Qcow2) || args.backing.is_some() {
        bail!("{spec}: an RBD image is served as it is (no --format qcow2, no --backing)");
    }
    if args.size.is_some() {
        bail!(
            "{spec}: --size does not create RBD images; create it with `rbd create {}/{} --size SIZE`",
            spec.pool,
            spec.image
        );
    }
    let opts = RbdOptions {
        conf: args.ceph_conf.clone(),
        id: args.ceph_id.clone(),
        readonly: args.readonly,
        timeout: std::time::Duration::from_secs(args.rbd_timeout),
        exclusive: args.rbd_exclusive,
        cache: args.rbd_cache,
    };
    match Disk::open_rbd(&spec, &opts) {
        Ok(disk) => Ok(disk),
        Err(e @ RbdError::Ceph { call: "rbd_lock_acquire", .. }) => Err(anyhow::Error::new(e).context(format!(
            "cannot take the exclusive lock of {spec}: another client (a vblk serve, QEMU) keeps it; stop that one, \
             or serve without --rbd-exclusive"
        ))),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot open {spec}"))),
    }
}
