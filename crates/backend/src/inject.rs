//! Fault injection from below: a [`FaultSpec`] makes the backend fail, shorten or delay
//! chosen ops, so tests can watch what the layers above (the virtio-blk pipeline, the
//! guest) do with a failing disk. **A testing aid**: `vblk serve --inject SPEC`.
//!
//! ## Grammar
//!
//! ```text
//! SPEC  := ITEM { (';' | ',') ITEM }
//! ITEM  := 'seed=' N                       seed of the rate= generator (default 0)
//!        | OPS ':' FAULT { '@' COND }
//!        | 'submit:eagain' [ '@times=' N ]   the next N (default 1) io_uring submissions
//!                                          fail with EAGAIN before reaching the kernel,
//!                                          their SQEs left queued
//! OPS   := OP { '+' OP }
//! OP    := read | write | flush | discard | write-zeroes | any
//! FAULT := eio | enospc                    fail with that errno
//!        | short                           transfer only the first half (rounded down to
//!                                          512 bytes) and report it (reads and writes only)
//!        | delay=DUR                       start the op DUR later (DUR: 250us, 5ms, 2s)
//! COND  := offset=START-END                the op overlaps bytes [START, END) (sizes take
//!                                          K/M/G suffixes; never matches a flush)
//!        | rate=P                          with probability P (0 < P <= 1), deterministic
//!        | after=N                         the first N matching ops pass, later ones fire
//!        | times=N                         fire at most N times
//! ```
//!
//! Examples: `read:eio@offset=0-1M`, `write:enospc@rate=0.1`, `flush:eio`, `write:short`,
//! `any:delay=5ms`, `write:eio@after=100`, `seed=7;read+write:eio@rate=0.01@times=3`.
//!
//! ## Semantics
//!
//! Faults are decided when an op is pushed to the [`crate::Engine`] (after its own checks:
//! an op out of range or on a read-only disk fails as it always does), so they cover every
//! engine flavour alike. Every rule whose ops and offset range match an op *counts* it (for
//! `after=` and `rate=`), in the order of pushes across all worker threads. The first
//! matching error/short rule that fires decides the outcome; the delays of every firing
//! delay rule add up. An injected error completes the op without touching the disk; an
//! injected flush error also sets the disk's sticky flush failure, exactly like a real one,
//! so every later flush fails. A delayed op is held by its engine until its deadline (a
//! timerfd wakes the worker; no thread per op) and then runs, or fails, as decided.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::bounce::truncate_iovecs;
use crate::disk::Disk;
use crate::{parse_size, sync, BackendError, IoOp, OpKind};

pub(crate) mod delay;

/// A parsed `--inject` specification: see the module docs for the grammar.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    seed: u64,
    rules: Vec<Rule>,
    /// `submit:eagain@times=N`: io_uring submissions to fail with EAGAIN.
    submit_eagain: u64,
}

/// A set of op kinds (bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpSet(u8);

const OP_NAMES: [(&str, u8); 5] = [("read", 1), ("write", 2), ("flush", 4), ("discard", 8), ("write-zeroes", 16)];
const ANY: u8 = 31;
const DATA: u8 = 1 | 2;

impl OpSet {
    fn bit(kind: OpKind) -> u8 {
        match kind {
            OpKind::Read => 1,
            OpKind::Write => 2,
            OpKind::Flush => 4,
            OpKind::Discard => 8,
            OpKind::WriteZeroes { .. } => 16,
        }
    }

    fn contains(self, kind: OpKind) -> bool {
        self.0 & OpSet::bit(kind) != 0
    }
}

/// What a rule does to an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Eio,
    Enospc,
    Short,
    Delay(Duration),
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    ops: OpSet,
    fault: Fault,
    /// Bytes `[start, end)`.
    range: Option<(u64, u64)>,
    rate: Option<f64>,
    after: u64,
    times: Option<u64>,
}

/// Why a fault spec does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultSpecError {
    #[error("empty fault spec (expected rules like `read:eio@offset=0-1M;flush:eio`)")]
    Empty,
    #[error("`{0}`: expected OPS:FAULT[@COND...] (e.g. `write:eio@rate=0.1`) or seed=N")]
    Syntax(String),
    #[error("`{0}`: unknown op (expected read, write, flush, discard, write-zeroes or any, joined with +)")]
    UnknownOp(String),
    #[error("`{0}`: unknown fault (expected eio, enospc, short or delay=DURATION)")]
    UnknownFault(String),
    #[error("`{0}`: unknown condition (expected offset=START-END, rate=P, after=N or times=N)")]
    UnknownCondition(String),
    #[error("`{item}`: {why}")]
    BadValue { item: String, why: &'static str },
}

impl FaultSpec {
    /// Whether any rule delays ops (the engines then need a timer).
    pub(crate) fn has_delays(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.fault, Fault::Delay(_)))
    }
}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;

    fn from_str(s: &str) -> Result<FaultSpec, FaultSpecError> {
        let mut spec = FaultSpec { seed: 0, rules: Vec::new(), submit_eagain: 0 };
        for item in s.split([';', ',']).map(str::trim).filter(|i| !i.is_empty()) {
            if let Some(seed) = item.strip_prefix("seed=") {
                spec.seed = parse_u64(item, seed)?;
            } else if let Some(rest) = item.strip_prefix("submit:") {
                spec.submit_eagain += match rest.trim() {
                    "eagain" => 1,
                    r => match r.strip_prefix("eagain@times=") {
                        Some(n) => parse_u64(item, n)?.max(1),
                        None => return Err(bad(item, "submit faults are `submit:eagain[@times=N]`")),
                    },
                };
            } else {
                spec.rules.push(parse_rule(item)?);
            }
        }
        if spec.rules.is_empty() && spec.submit_eagain == 0 {
            return Err(FaultSpecError::Empty);
        }
        Ok(spec)
    }
}

fn bad(item: &str, why: &'static str) -> FaultSpecError {
    FaultSpecError::BadValue { item: item.to_string(), why }
}

fn parse_u64(item: &str, v: &str) -> Result<u64, FaultSpecError> {
    v.parse().map_err(|_| bad(item, "expected a whole number"))
}

fn parse_rule(item: &str) -> Result<Rule, FaultSpecError> {
    let (ops, rest) = item.split_once(':').ok_or_else(|| FaultSpecError::Syntax(item.to_string()))?;
    let mut parts = rest.split('@').map(str::trim);
    let fault = parts.next().unwrap_or_default();
    let mut set = 0;
    for op in ops.split('+').map(str::trim) {
        set |= match op {
            "any" => ANY,
            _ => OP_NAMES.iter().find(|(n, _)| *n == op).map(|(_, b)| *b).ok_or_else(|| {
                FaultSpecError::UnknownOp(if op.is_empty() { item.to_string() } else { op.to_string() })
            })?,
        };
    }
    let fault = match fault {
        "eio" => Fault::Eio,
        "enospc" => Fault::Enospc,
        "short" => Fault::Short,
        f => match f.strip_prefix("delay=") {
            Some(d) => Fault::Delay(parse_duration(item, d)?),
            None if f.is_empty() => return Err(FaultSpecError::Syntax(item.to_string())),
            None => return Err(FaultSpecError::UnknownFault(f.to_string())),
        },
    };
    if fault == Fault::Short && set & !DATA != 0 && set != ANY {
        return Err(bad(item, "short applies to reads and writes only"));
    }
    let mut rule = Rule { ops: OpSet(set), fault, range: None, rate: None, after: 0, times: None };
    for cond in parts {
        let (key, value) = cond.split_once('=').ok_or_else(|| FaultSpecError::UnknownCondition(cond.to_string()))?;
        match key {
            "offset" => {
                let (a, b) = value.split_once('-').ok_or_else(|| bad(item, "offset wants START-END"))?;
                let start = parse_size(a).map_err(|_| bad(item, "bad offset START (e.g. 0, 4K, 1M)"))?;
                let end = parse_size(b).map_err(|_| bad(item, "bad offset END (e.g. 4K, 1M, 2G)"))?;
                if end <= start {
                    return Err(bad(item, "offset END must be above START"));
                }
                rule.range = Some((start, end));
            }
            "rate" => {
                let p: f64 = value.parse().map_err(|_| bad(item, "rate wants a number"))?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(bad(item, "rate must be above 0 and at most 1"));
                }
                rule.rate = Some(p);
            }
            "after" => rule.after = parse_u64(item, value)?,
            "times" => {
                let t = parse_u64(item, value)?;
                if t == 0 {
                    return Err(bad(item, "times must be at least 1"));
                }
                rule.times = Some(t);
            }
            _ => return Err(FaultSpecError::UnknownCondition(cond.to_string())),
        }
    }
    Ok(rule)
}

/// `250us`, `5ms`, `2s`.
fn parse_duration(item: &str, s: &str) -> Result<Duration, FaultSpecError> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad(item, "delay wants a duration like 500us, 5ms or 2s"))?;
    match unit {
        "us" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(bad(item, "delay wants a unit: us, ms or s")),
    }
}

impl fmt::Display for FaultSpec {
    /// The canonical form, which parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={}", self.seed)?;
        if self.submit_eagain > 0 {
            write!(f, ";submit:eagain@times={}", self.submit_eagain)?;
        }
        for r in &self.rules {
            f.write_str(";")?;
            if r.ops.0 == ANY {
                f.write_str("any")?;
            } else {
                let names: Vec<&str> = OP_NAMES.iter().filter(|(_, b)| r.ops.0 & b != 0).map(|(n, _)| *n).collect();
                f.write_str(&names.join("+"))?;
            }
            match r.fault {
                Fault::Eio => f.write_str(":eio")?,
                Fault::Enospc => f.write_str(":enospc")?,
                Fault::Short => f.write_str(":short")?,
                Fault::Delay(d) => match d.as_micros() {
                    us if us % 1_000_000 == 0 => write!(f, ":delay={}s", us / 1_000_000)?,
                    us if us % 1000 == 0 => write!(f, ":delay={}ms", us / 1000)?,
                    us => write!(f, ":delay={us}us")?,
                },
            }
            if let Some((a, b)) = r.range {
                write!(f, "@offset={a}-{b}")?;
            }
            if let Some(p) = r.rate {
                write!(f, "@rate={p}")?;
            }
            if r.after > 0 {
                write!(f, "@after={}", r.after)?;
            }
            if let Some(t) = r.times {
                write!(f, "@times={t}")?;
            }
        }
        Ok(())
    }
}

/// What happens to one op (decided by [`Faults::decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Run it normally.
    Run,
    /// Complete it with this errno, touching nothing.
    Fail(i32),
    /// Transfer the first half only and report that ([`short_transfer`]).
    Short,
}

/// The decision for one op: start it `delay` from now, then apply `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub delay: Duration,
    pub outcome: Outcome,
}

/// Per-rule counters, shared by every engine of a disk.
#[derive(Debug, Default)]
struct RuleState {
    /// Matching ops seen.
    seen: AtomicU64,
    /// Times fired.
    fired: AtomicU64,
}

/// A [`FaultSpec`] in force on a disk (see [`crate::Disk::with_faults`]): the spec and its
/// counters, shared by all worker threads.
#[derive(Debug)]
pub struct Faults {
    spec: FaultSpec,
    state: Vec<RuleState>,
    injected: AtomicU64,
    /// Injected submission failures left.
    submit_eagain: AtomicU64,
}

impl Faults {
    pub(crate) fn new(spec: FaultSpec) -> Faults {
        let state = spec.rules.iter().map(|_| RuleState::default()).collect();
        let submit_eagain = AtomicU64::new(spec.submit_eagain);
        Faults { spec, state, injected: AtomicU64::new(0), submit_eagain }
    }

    /// Whether this io_uring submission is to fail with EAGAIN (`submit:eagain`).
    pub(crate) fn fail_submit(&self) -> bool {
        let fire = self.submit_eagain.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        if fire {
            self.injected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("injecting EAGAIN into an io_uring submission");
        }
        fire
    }

    /// The spec in force.
    pub fn spec(&self) -> &FaultSpec {
        &self.spec
    }

    /// How many faults (errors, short transfers, delays) have been injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Decide what happens to `op` (see the module docs), advancing the counters.
    pub(crate) fn decide(&self, op: &IoOp) -> Decision {
        let mut d = Decision { delay: Duration::ZERO, outcome: Outcome::Run };
        for (i, (rule, state)) in self.spec.rules.iter().zip(&self.state).enumerate() {
            if !rule.matches(op) {
                continue;
            }
            let n = state.seen.fetch_add(1, Ordering::Relaxed);
            let is_delay = matches!(rule.fault, Fault::Delay(_));
            if (!is_delay && d.outcome != Outcome::Run) || !self.fires(i, rule, state, n) {
                continue;
            }
            self.injected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(op = op.kind.name(), offset = op.offset, len = op.len, fault = ?rule.fault, "injecting fault");
            match rule.fault {
                Fault::Delay(t) => d.delay = d.delay.saturating_add(t),
                Fault::Eio => d.outcome = Outcome::Fail(libc::EIO),
                Fault::Enospc => d.outcome = Outcome::Fail(libc::ENOSPC),
                Fault::Short => d.outcome = Outcome::Short,
            }
        }
        d
    }

    /// Whether rule `i` fires for the `n`-th op it matched (counting from 0).
    fn fires(&self, i: usize, rule: &Rule, state: &RuleState, n: u64) -> bool {
        if n < rule.after {
            return false;
        }
        if rule.rate.is_some_and(|p| unit_interval(self.spec.seed, i as u64, n) >= p) {
            return false;
        }
        match rule.times {
            None => true,
            Some(t) => {
                state.fired.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| (f < t).then_some(f + 1)).is_ok()
            }
        }
    }
}

impl Rule {
    fn matches(&self, op: &IoOp) -> bool {
        if !self.ops.contains(op.kind) || (self.fault == Fault::Short && !OpSet(DATA).contains(op.kind)) {
            return false;
        }
        match self.range {
            None => true,
            Some(_) if op.kind == OpKind::Flush => false,
            Some((start, end)) => op.offset < end && start < op.offset.saturating_add(op.len),
        }
    }
}

/// SplitMix64: a tiny, well-mixed, stateless step for the deterministic rate generator.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in `[0, 1)` for the `n`-th op matched by rule `rule` under `seed`.
fn unit_interval(seed: u64, rule: u64, n: u64) -> f64 {
    let x = splitmix64(splitmix64(seed ^ splitmix64(rule)) ^ n);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The error an injected fault completes `kind` with.
pub(crate) fn injected_error(kind: OpKind, errno: i32) -> BackendError {
    let op = match kind {
        OpKind::Read => "read (injected fault)",
        OpKind::Write => "write (injected fault)",
        OpKind::Flush => "flush (injected fault)",
        OpKind::Discard => "discard (injected fault)",
        OpKind::WriteZeroes { .. } => "write-zeroes (injected fault)",
    };
    BackendError::errno(op, errno)
}

/// An injected short transfer: move only the first half of `op`'s data (rounded down to
/// 512 bytes, possibly nothing) synchronously, and report that many bytes. The rest of a
/// read's buffers keeps whatever it held: the layer above must not take it for data.
///
/// # Safety
/// As for [`crate::Engine::push`]: `op.iovs` are valid for writes (read) or reads (write).
pub(crate) unsafe fn short_transfer(disk: &Disk, op: &IoOp) -> Result<u64, BackendError> {
    let n = (op.len / 2) & !511;
    if n == 0 || disk.is_null() {
        return Ok(n);
    }
    let mut iovs = op.iovs.clone();
    truncate_iovecs(&mut iovs, n as usize);
    let part = IoOp { kind: op.kind, offset: op.offset, len: n, iovs, fua: op.fua, tag: op.tag };
    // SAFETY: `part.iovs` is a prefix of `op.iovs`, covered by the caller's contract.
    unsafe { sync::read_write(disk, &part, &mut Vec::new()) }.map(|_| n)
}
