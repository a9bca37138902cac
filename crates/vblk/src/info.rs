//! `vblk info`: what a vhost-user-blk backend offers and what the driver negotiated.

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vblk_driver::DeviceInfo;

use crate::size::human;
use crate::target::{Target, TargetArgs, Want};

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Virtio feature bits by name (device-independent and virtio-blk, virtio 1.2 §5.2.3, §6).
const FEATURES: &[(u32, &str)] = &[
    (0, "BARRIER"),
    (1, "SIZE_MAX"),
    (2, "SEG_MAX"),
    (4, "GEOMETRY"),
    (5, "RO"),
    (6, "BLK_SIZE"),
    (7, "SCSI"),
    (9, "FLUSH"),
    (10, "TOPOLOGY"),
    (11, "CONFIG_WCE"),
    (12, "MQ"),
    (13, "DISCARD"),
    (14, "WRITE_ZEROES"),
    (15, "LIFETIME"),
    (16, "SECURE_ERASE"),
    (17, "ZONED"),
    (24, "NOTIFY_ON_EMPTY"),
    (27, "ANY_LAYOUT"),
    (28, "INDIRECT_DESC"),
    (29, "EVENT_IDX"),
    (30, "VHOST_USER_PROTOCOL_FEATURES"),
    (32, "VERSION_1"),
    (33, "ACCESS_PLATFORM"),
    (34, "RING_PACKED"),
    (35, "IN_ORDER"),
    (36, "ORDER_PLATFORM"),
    (37, "SR_IOV"),
    (38, "NOTIFICATION_DATA"),
    (39, "NOTIF_CONFIG_DATA"),
    (40, "RING_RESET"),
    (41, "ADMIN_VQ"),
];

/// vhost-user protocol feature bits by name.
const PROTOCOL_FEATURES: &[(u32, &str)] = &[
    (0, "MQ"),
    (1, "LOG_SHMFD"),
    (2, "RARP"),
    (3, "REPLY_ACK"),
    (4, "MTU"),
    (5, "BACKEND_REQ"),
    (6, "CROSS_ENDIAN"),
    (7, "CRYPTO_SESSION"),
    (8, "PAGEFAULT"),
    (9, "CONFIG"),
    (10, "BACKEND_SEND_FD"),
    (11, "HOST_NOTIFIER"),
    (12, "INFLIGHT_SHMFD"),
    (13, "RESET_DEVICE"),
    (14, "INBAND_NOTIFICATIONS"),
    (15, "CONFIGURE_MEM_SLOTS"),
    (16, "STATUS"),
    (17, "XEN_MMAP"),
    (18, "SHARED_OBJECT"),
    (19, "DEVICE_STATE"),
];

/// The names of the bits set in `bits` (`bit N` for unknown ones).
pub fn names(bits: u64, table: &[(u32, &str)]) -> Vec<String> {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| table.iter().find(|(n, _)| *n == b).map_or_else(|| format!("bit {b}"), |(_, s)| s.to_string()))
        .collect()
}

pub fn feature_names(bits: u64) -> Vec<String> {
    names(bits, FEATURES)
}

#[derive(Serialize)]
struct Limits {
    seg_max: u32,
    size_max: u32,
    max_discard_sectors: u32,
    max_discard_seg: u32,
    discard_sector_alignment: u32,
    max_write_zeroes_sectors: u32,
    max_write_zeroes_seg: u32,
    write_zeroes_may_unmap: bool,
}

#[derive(Serialize)]
struct Report {
    target: String,
    capacity: Option<u64>,
    block_size: u32,
    queues: u16,
    queue_size: u16,
    /// `split` or `packed`: the virtqueue layout negotiated.
    ring: &'static str,
    features: Vec<String>,
    features_hex: String,
    offered_features: Vec<String>,
    protocol_features: Vec<String>,
    limits: Limits,
    physical_block_exp: u8,
    min_io_size: u16,
    opt_io_size: u32,
    readonly: bool,
    write_cache: &'static str,
    serial: Option<String>,
}

fn report(label: &str, i: &DeviceInfo) -> Report {
    let c = i.config.unwrap_or_default();
    Report {
        target: label.to_string(),
        capacity: i.capacity,
        block_size: i.block_size,
        queues: i.max_queues,
        queue_size: i.queue_size,
        ring: i.ring.name(),
        features: feature_names(i.features),
        features_hex: format!("{:#x}", i.features),
        offered_features: feature_names(i.offered_features),
        protocol_features: names(i.protocol_features, PROTOCOL_FEATURES),
        limits: Limits {
            seg_max: i.seg_max,
            size_max: i.size_max,
            max_discard_sectors: i.max_discard_sectors,
            max_discard_seg: i.max_discard_seg,
            discard_sector_alignment: if i.max_discard_seg != 0 { c.discard_sector_alignment } else { 0 },
            max_write_zeroes_sectors: i.max_write_zeroes_sectors,
            max_write_zeroes_seg: i.max_write_zeroes_seg,
            write_zeroes_may_unmap: i.write_zeroes_may_unmap,
        },
        physical_block_exp: c.physical_block_exp,
        min_io_size: c.min_io_size,
        opt_io_size: c.opt_io_size,
        readonly: i.readonly,
        write_cache: if i.writeback { "write-back" } else { "write-through" },
        serial: i.serial.clone(),
    }
}

fn print_human(r: &Report, i: &DeviceInfo) {
    let cap = match r.capacity {
        Some(c) => format!("{} ({c} bytes, {} sectors)", human(c), c / 512),
        None => "unknown (the backend offers no config space)".into(),
    };
    println!("target:        {}", r.target);
    println!("capacity:      {cap}");
    println!("block size:    {}", r.block_size);
    if r.physical_block_exp != 0 || r.min_io_size != 0 || r.opt_io_size != 0 {
        println!(
            "topology:      physical block {} B, min I/O {} blocks, optimal I/O {} blocks",
            r.block_size << r.physical_block_exp.min(20),
            r.min_io_size,
            r.opt_io_size
        );
    }
    println!("queues:        {} (queue size {})", r.queues, r.queue_size);
    println!("ring:          {}", r.ring);
    println!("features:      {}", r.features.join(" "));
    let refused = feature_names(i.offered_features & !i.features);
    if !refused.is_empty() {
        println!("  not used:    {}", refused.join(" "));
    }
    println!("protocol:      {}", r.protocol_features.join(" "));
    let l = &r.limits;
    let or_none = |v: u32| if v == 0 { "-".to_string() } else { v.to_string() };
    println!("seg_max:       {}", or_none(l.seg_max));
    println!("size_max:      {}", if l.size_max == 0 { "-".into() } else { human(l.size_max as u64) });
    if l.max_discard_seg != 0 {
        println!(
            "discard:       up to {} sectors ({}), {} segment(s), alignment {} sectors",
            l.max_discard_sectors,
            human(l.max_discard_sectors as u64 * 512),
            l.max_discard_seg,
            l.discard_sector_alignment
        );
    } else {
        println!("discard:       not supported");
    }
    if l.max_write_zeroes_seg != 0 {
        println!(
            "write zeroes:  up to {} sectors ({}), {} segment(s){}",
            l.max_write_zeroes_sectors,
            human(l.max_write_zeroes_sectors as u64 * 512),
            l.max_write_zeroes_seg,
            if l.write_zeroes_may_unmap { ", may unmap" } else { "" }
        );
    } else {
        println!("write zeroes:  not supported");
    }
    println!("read-only:     {}", if r.readonly { "yes" } else { "no" });
    println!("write cache:   {}", r.write_cache);
    println!("serial:        {}", r.serial.as_deref().unwrap_or("-"));
}

pub fn run(args: InfoArgs) -> Result<()> {
    let want = Want { num_queues: 1, iodepth: 1, buffer_memory: 1 << 20, temp_image: None, needs_storage: false };
    let target = Target::open(&args.target, &want)?;
    let r = report(&target.label, target.info());
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_human(&r, target.info());
    }
    target.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_bits_have_names() {
        let bits = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 9) | (1 << 13) | (1 << 63);
        assert_eq!(feature_names(bits), ["FLUSH", "DISCARD", "INDIRECT_DESC", "EVENT_IDX", "VERSION_1", "bit 63"]);
    }
}
