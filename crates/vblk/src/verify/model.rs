//! The model `vblk verify` checks against: for each block of the region, which op last
//! wrote it (its content is derived from seed, op id and block number), or "zero", or
//! "unknown" (never written, discarded, or a failed write); plus the request planner and
//! the set of ranges in flight.

use serde::Serialize;

use crate::rng::{splitmix64, Rng};
use crate::size::human;

/// Model states besides "written by op N".
pub(super) const UNKNOWN: u64 = u64::MAX;
pub(super) const ZERO: u64 = u64::MAX - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes { unmap: bool },
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Planned {
    pub(super) id: u64,
    pub(super) kind: Kind,
    pub(super) block: u64,
    pub(super) nblocks: u64,
}

#[derive(Default, Serialize, Clone, Copy)]
pub(super) struct Counts {
    pub(super) read: u64,
    pub(super) write: u64,
    pub(super) flush: u64,
    pub(super) discard: u64,
    pub(super) write_zeroes: u64,
}

impl Counts {
    pub(super) fn slot(&mut self, k: Kind) -> &mut u64 {
        match k {
            Kind::Read => &mut self.read,
            Kind::Write => &mut self.write,
            Kind::Flush => &mut self.flush,
            Kind::Discard => &mut self.discard,
            Kind::WriteZeroes { .. } => &mut self.write_zeroes,
        }
    }
}

#[derive(Serialize, Clone, Debug)]
pub(super) struct Mismatch {
    pub(super) offset: u64,
    pub(super) expected: String,
    pub(super) found: String,
    /// What the model says the block holds.
    pub(super) model: String,
    /// Which read saw it.
    pub(super) during: String,
}

/// Everything the queue threads share.
pub(super) struct State {
    pub(super) bs: u64,
    pub(super) seed: u64,
    pub(super) model: Vec<u64>,
    pub(super) in_flight: Vec<(u64, u64)>,
    pub(super) rng: Rng,
    pub(super) planned: u64,
    pub(super) total: u64,
    /// Max blocks per request: rw, discard, write-zeroes (0: not negotiated).
    pub(super) max_blocks: [u64; 3],
    pub(super) flush: bool,
    pub(super) may_unmap: bool,
    pub(super) counts: Counts,
    pub(super) bytes: Counts,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) mismatch: Option<Mismatch>,
    pub(super) stop: bool,
}

pub(super) fn block_data(seed: u64, op: u64, block: u64, out: &mut [u8]) {
    let mut s = seed ^ op.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.wrapping_mul(0xd6e8_feb8_6659_fd93);
    for c in out.chunks_mut(8) {
        c.copy_from_slice(&splitmix64(&mut s).to_le_bytes()[..c.len()]);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

impl State {
    pub(super) fn plan(&mut self) -> Option<Planned> {
        if self.stop || self.planned >= self.total {
            return None;
        }
        let id = self.planned;
        self.planned += 1;
        let [rw, discard, wz] = self.max_blocks;
        let kind = match self.rng.below(100) {
            0..40 => Kind::Write,
            40..75 => Kind::Read,
            75..80 if self.flush => Kind::Flush,
            80..90 if discard > 0 => Kind::Discard,
            90..100 if wz > 0 => Kind::WriteZeroes { unmap: self.may_unmap && self.rng.percent(50) },
            x if x % 2 == 0 => Kind::Write,
            _ => Kind::Read,
        };
        let max = match kind {
            Kind::Discard => discard,
            Kind::WriteZeroes { .. } => wz,
            _ => rw,
        }
        .min(self.model.len() as u64);
        // Half small requests, half up to the largest.
        let nblocks = 1 + if self.rng.percent(50) { self.rng.below(max.min(8)) } else { self.rng.below(max) };
        let block = self.rng.below(self.model.len() as u64 - nblocks + 1);
        Some(Planned { id, kind, block, nblocks })
    }

    pub(super) fn overlaps(&self, p: &Planned) -> bool {
        p.kind != Kind::Flush && self.in_flight.iter().any(|&(b, n)| b < p.block + p.nblocks && p.block < b + n)
    }

    pub(super) fn set(&mut self, p: &Planned, v: u64) {
        self.model[p.block as usize..(p.block + p.nblocks) as usize].fill(v);
    }

    /// Compare what was read at `block` with the model; the first difference, if any.
    pub(super) fn check(&self, block: u64, data: &[u8], during: &str) -> Option<Mismatch> {
        let bs = self.bs as usize;
        let mut expected = vec![0u8; bs];
        for (i, got) in data.chunks(bs).enumerate() {
            let b = block + i as u64;
            let state = self.model[b as usize];
            match state {
                UNKNOWN => continue,
                ZERO => expected.fill(0),
                op => block_data(self.seed, op, b, &mut expected),
            }
            if let Some(pos) = got.iter().zip(&expected).position(|(a, e)| a != e) {
                let end = (pos + 16).min(bs);
                return Some(Mismatch {
                    offset: b * self.bs + pos as u64,
                    expected: hex(&expected[pos..end]),
                    found: hex(&got[pos..end]),
                    model: match state {
                        ZERO => "zeroed by a write-zeroes".into(),
                        op => format!("written by op #{op}"),
                    },
                    during: during.into(),
                });
            }
        }
        None
    }

    pub(super) fn complete(&mut self, p: Planned, result: Result<(), String>, data: Option<&[u8]>) {
        self.in_flight.retain(|&(b, n)| (b, n) != (p.block, p.nblocks));
        *self.counts.slot(p.kind) += 1;
        if result.is_ok() && p.kind != Kind::Flush {
            *self.bytes.slot(p.kind) += p.nblocks * self.bs;
        }
        if let Err(e) = &result {
            self.errors += 1;
            self.first_error.get_or_insert_with(|| format!("{:?} op #{} at {}: {e}", p.kind, p.id, p.block * self.bs));
        }
        match (p.kind, result.is_ok()) {
            (Kind::Write, true) => self.set(&p, p.id),
            (Kind::WriteZeroes { .. }, true) => self.set(&p, ZERO),
            (Kind::Write | Kind::WriteZeroes { .. } | Kind::Discard, _) => self.set(&p, UNKNOWN),
            (Kind::Read, true) => {
                let during = format!("read op #{} ({} at {:#x})", p.id, human(p.nblocks * self.bs), p.block * self.bs);
                if let Some(m) = data.and_then(|d| self.check(p.block, d, &during)) {
                    self.mismatch.get_or_insert(m);
                    self.stop = true;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(blocks: usize) -> State {
        State {
            bs: 512,
            seed: 42,
            model: vec![UNKNOWN; blocks],
            in_flight: Vec::new(),
            rng: Rng::new(42),
            planned: 0,
            total: 1000,
            max_blocks: [16, 16, 16],
            flush: true,
            may_unmap: true,
            counts: Counts::default(),
            bytes: Counts::default(),
            errors: 0,
            first_error: None,
            mismatch: None,
            stop: false,
        }
    }

    fn written(seed: u64, op: u64, block: u64, n: u64) -> Vec<u8> {
        let mut v = vec![0u8; (n * 512) as usize];
        for (i, c) in v.chunks_mut(512).enumerate() {
            block_data(seed, op, block + i as u64, c);
        }
        v
    }

    #[test]
    fn the_model_catches_wrong_stale_and_misplaced_data() {
        let mut st = state(16);
        let w = Planned { id: 7, kind: Kind::Write, block: 2, nblocks: 3 };
        st.in_flight.push((2, 3));
        st.complete(w, Ok(()), None);
        assert!(st.in_flight.is_empty());
        let good = written(42, 7, 2, 3);
        assert!(st.check(2, &good, "t").is_none());
        // Unknown blocks around it are not checked.
        assert!(st.check(0, &[0xaa; 512 * 2], "t").is_none());
        let mut bad = good.clone();
        bad[700] ^= 1;
        let m = st.check(2, &bad, "t").expect("a flipped byte");
        assert_eq!(m.offset, 2 * 512 + 700);
        assert!(m.model.contains("#7"));
        // Data of another op, or of the right op at another place.
        assert!(st.check(2, &written(42, 8, 2, 3), "t").is_some());
        assert!(st.check(2, &written(42, 7, 3, 3), "t").is_some());
        // Write-zeroes, then discard.
        st.complete(Planned { id: 9, kind: Kind::WriteZeroes { unmap: true }, block: 3, nblocks: 1 }, Ok(()), None);
        assert!(st.check(3, &[0; 512], "t").is_none());
        assert_eq!(st.check(3, &[1; 512], "t").map(|m| m.offset), Some(3 * 512));
        st.complete(Planned { id: 10, kind: Kind::Discard, block: 2, nblocks: 2 }, Ok(()), None);
        assert!(st.check(2, &[0x55; 1024], "t").is_none());
        // A failed write leaves the range unknown and counts as an error.
        st.complete(Planned { id: 11, kind: Kind::Write, block: 4, nblocks: 1 }, Err("io".into()), None);
        assert_eq!(st.errors, 1);
        assert!(st.check(4, &[0x55; 512], "t").is_none());
        // A read that sees the wrong data stops the run.
        st.complete(Planned { id: 12, kind: Kind::Write, block: 6, nblocks: 1 }, Ok(()), None);
        st.complete(Planned { id: 13, kind: Kind::Read, block: 6, nblocks: 1 }, Ok(()), Some(&written(42, 12, 6, 1)));
        assert!(!st.stop);
        st.complete(Planned { id: 14, kind: Kind::Read, block: 6, nblocks: 1 }, Ok(()), Some(&[9; 512]));
        assert!(st.stop && st.mismatch.is_some());
        assert_eq!(st.plan().map(|p| p.id), None);
    }

    #[test]
    fn planned_requests_fit_the_region_and_limits() {
        let mut st = state(64);
        st.max_blocks = [16, 4, 0];
        let mut kinds = std::collections::HashSet::new();
        for _ in 0..1000 {
            let p = st.plan().expect("ops left");
            assert!(p.nblocks >= 1 && p.block + p.nblocks <= 64);
            match p.kind {
                Kind::Discard => assert!(p.nblocks <= 4),
                Kind::WriteZeroes { .. } => panic!("write zeroes not negotiated"),
                _ => assert!(p.nblocks <= 16),
            }
            kinds.insert(std::mem::discriminant(&p.kind));
        }
        assert_eq!(kinds.len(), 4);
        assert!(st.plan().is_none(), "--ops reached");
        let a = Planned { id: 0, kind: Kind::Read, block: 10, nblocks: 4 };
        st.in_flight.push((12, 8));
        assert!(st.overlaps(&a));
        assert!(!st.overlaps(&Planned { block: 20, ..a }));
        assert!(!st.overlaps(&Planned { kind: Kind::Flush, ..a }));
    }
}
