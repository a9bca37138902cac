//! `vblk top`: a live view of a running `vblk serve --control PATH`. A sampler thread calls
//! `export_stats` every interval (reconnecting while the daemon is away); the main thread
//! turns the samples into rates ([`model`]), draws them ([`draw`]) and reads the keys, so a
//! daemon that hangs never stops `q` from working.

mod draw;
mod model;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::DefaultTerminal;
use serde_json::{json, Value};

use crate::daemon::rpc::{Client, ClientError};
use model::{ExportView, Model};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", env = "VBLK_CONTROL", default_value = "vblk.ctl")]
    pub control: PathBuf,
    /// Refresh every this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub interval_ms: u64,
}

pub enum Status {
    Connecting,
    Connected,
    Disconnected(String),
}

/// What the screen shows.
pub struct App {
    control: PathBuf,
    interval: Duration,
    model: Model,
    status: Status,
    /// The export whose sparklines are shown (kept by name across additions and removals).
    selected: Option<String>,
    last_sample: Option<Instant>,
}

impl App {
    fn selected(&self) -> Option<&ExportView> {
        let name = self.selected.as_deref()?;
        self.model.exports.iter().find(|e| e.name == name)
    }

    fn apply(&mut self, sample: Result<Value, String>) {
        match sample {
            Ok(stats) => {
                self.status = Status::Connected;
                self.model.update(&stats);
                self.last_sample = Some(Instant::now());
            }
            Err(why) => {
                self.status = Status::Disconnected(why);
                self.model.reset();
                self.last_sample = None;
            }
        }
        if self.selected().is_none() {
            self.selected = self.model.exports.first().map(|e| e.name.clone());
        }
    }

    /// Select the export `step` rows down (negative: up), staying within the list.
    fn select(&mut self, step: isize) {
        let exports = &self.model.exports;
        let Some(at) = exports.iter().position(|e| Some(&e.name) == self.selected.as_ref()) else { return };
        let to = at.saturating_add_signed(step).min(exports.len() - 1);
        self.selected = Some(exports[to].name.clone());
    }
}

pub fn run(args: TopArgs) -> Result<()> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!("vblk top needs a terminal (`vblk ctl stats` prints the counters as text)");
    }
    let interval = Duration::from_millis(args.interval_ms);
    // SIGTERM, SIGHUP (the terminal closed) and SIGINT end it cleanly, terminal restored.
    let quit = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, Arc::clone(&quit)).context("cannot install a signal handler")?;
    }
    let samples = sampler(args.control.clone(), interval)?;
    let mut app = App {
        control: args.control,
        interval,
        model: Model::default(),
        status: Status::Connecting,
        selected: None,
        last_sample: None,
    };
    // Raw mode, the alternate screen, and a panic hook that restores the terminal.
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let result = ui(&mut terminal, &mut app, &samples, &quit);
    ratatui::restore();
    result
}

/// Draw, then wait for a key, a sample or a signal; until a quit key or signal.
fn ui(
    terminal: &mut DefaultTerminal,
    app: &mut App,
    samples: &Receiver<Result<Value, String>>,
    quit: &AtomicBool,
) -> Result<()> {
    loop {
        terminal.draw(|f| draw::draw(f, app))?;
        loop {
            if quit.load(Ordering::Relaxed) {
                return Ok(());
            }
            match samples.try_recv() {
                Ok(s) => {
                    app.apply(s);
                    break;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => bail!("the sampler thread died"),
            }
            match wait_for_input(Duration::from_millis(50)) {
                Input::Gone => return Ok(()),
                Input::Idle => continue,
                Input::Ready => {}
            }
            // Every event crossterm has (one read may hold several keys), then draw.
            let mut redraw = false;
            while event::poll(Duration::ZERO)? {
                match event::read()? {
                    Event::Key(k) if k.kind == KeyEventKind::Press => match key(k) {
                        Key::Quit => return Ok(()),
                        Key::Move(step) => {
                            app.select(step);
                            redraw = true;
                        }
                        Key::Other => {}
                    },
                    Event::Resize(..) => redraw = true,
                    _ => {}
                }
            }
            if redraw {
                break;
            }
        }
    }
}

enum Input {
    Ready,
    Idle,
    /// The terminal hung up (closed window, killed tmux).
    Gone,
}

/// Wait up to `timeout` for input on the terminal. Ourselves, not with crossterm's
/// `poll`: crossterm 0.28 spins forever on a terminal that hung up (a read of 0 bytes is
/// not an event, so it reads again), and would never see the quit signal.
fn wait_for_input(timeout: Duration) -> Input {
    let mut fd = libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
    if n <= 0 {
        return Input::Idle; // timeout, or EINTR (a signal: the caller checks the flag)
    }
    if fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        Input::Gone
    } else {
        Input::Ready
    }
}

enum Key {
    Quit,
    Move(isize),
    Other,
}

fn key(k: KeyEvent) -> Key {
    match k.code {
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => Key::Quit,
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
        KeyCode::Up | KeyCode::Char('k') => Key::Move(-1),
        KeyCode::Down | KeyCode::Char('j') => Key::Move(1),
        KeyCode::PageUp => Key::Move(-10),
        KeyCode::PageDown => Key::Move(10),
        KeyCode::Home => Key::Move(isize::MIN),
        KeyCode::End => Key::Move(isize::MAX),
        _ => Key::Other,
    }
}

/// A thread that sends an `export_stats` result (or why there is none) every `interval`,
/// connecting again after each failure. It ends when the receiver is gone.
fn sampler(control: PathBuf, interval: Duration) -> Result<Receiver<Result<Value, String>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("vblk-top-sampler".into())
        .spawn(move || {
            let mut client = None;
            let mut next = Instant::now();
            loop {
                let sample = sample(&mut client, &control);
                if sample.is_err() {
                    client = None;
                }
                let sample = sample.map_err(|e| match e {
                    ClientError::Connect { source, .. } => format!("cannot connect: {source}"),
                    e => e.to_string(),
                });
                if tx.send(sample).is_err() {
                    return;
                }
                next += interval;
                let now = Instant::now();
                match next.checked_duration_since(now) {
                    Some(wait) => std::thread::sleep(wait),
                    None => next = now,
                }
            }
        })
        .context("cannot start the sampler thread")?;
    Ok(rx)
}

fn sample(client: &mut Option<Client>, control: &Path) -> Result<Value, ClientError> {
    let c = match client {
        Some(c) => c,
        None => client.insert(Client::connect(control)?),
    };
    c.call("export_stats", json!({}))
}
