//! `vblk top`'s screen: a status line, the table of exports with a row per queue under
//! each, and the selected export's IOPS and bandwidth sparklines.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Row, Sparkline, Table, TableState};
use ratatui::Frame;

use super::model::{fmt_latency, fmt_mbps, fmt_rate, fmt_uptime, spark, ExportView, Rates};
use super::{App, Status};

/// Height of the sparkline pane.
const SPARK_HEIGHT: u16 = 8;

pub fn draw(f: &mut Frame, app: &App) {
    let spark_height = if app.model.exports.is_empty() { 0 } else { SPARK_HEIGHT };
    let [head, body, foot] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(spark_height)]).areas(f.area());
    f.render_widget(header(app), head);
    table(f, app, body);
    if let Some(e) = app.selected() {
        sparklines(f, app, e, foot);
    }
}

fn header(app: &App) -> Line<'static> {
    let control = app.control.display().to_string();
    let mut spans = vec![Span::from("vblk top ").bold(), Span::from(control.clone())];
    match &app.status {
        Status::Connecting => spans.push(Span::from("  connecting...")),
        Status::Disconnected(why) => {
            spans.push(Span::from(format!("  disconnected: {why}; retrying")).fg(Color::Red).bold());
        }
        Status::Connected => {
            let m = &app.model;
            spans.push(Span::from(format!(
                "  up {}  {} export{}",
                fmt_uptime(m.uptime),
                m.exports.len(),
                if m.exports.len() == 1 { "" } else { "s" }
            )));
            if let Some(age) = app.last_sample.map(|t| t.elapsed()).filter(|a| *a > 3 * app.interval) {
                spans.push(Span::from(format!("  no answer for {} s", age.as_secs())).fg(Color::Yellow));
            }
        }
    }
    spans.push(Span::from("  ↑↓ select  q quit").dim());
    Line::from(spans)
}

/// Column headers and widths; the name column's width follows the longest name and the
/// history column takes what is left.
const COLUMNS: [(&str, u16); 9] = [
    ("FRONTEND", 8),
    ("READ IOPS", 9),
    ("WRITE IOPS", 10),
    ("READ MB/s", 9),
    ("WRITE MB/s", 10),
    ("P50", 6),
    ("P99", 6),
    ("IN-FLIGHT", 9),
    ("ERR/s", 6),
];

fn table(f: &mut Frame, app: &App, area: Rect) {
    let exports = &app.model.exports;
    let name_width = exports.iter().map(|e| e.name.chars().count()).max().unwrap_or(0).clamp(6, 32) as u16;
    let fixed: u16 = name_width + COLUMNS.iter().map(|c| c.1 + 1).sum::<u16>() + 1;
    let history_width = area.width.saturating_sub(fixed) as usize;

    let mut widths = vec![Constraint::Length(name_width)];
    widths.extend(COLUMNS.iter().map(|c| Constraint::Length(c.1)));
    widths.push(Constraint::Fill(1));
    let mut head = vec![Cell::from("EXPORT")];
    head.extend(COLUMNS.iter().map(|(title, _)| {
        let l = Line::from(*title);
        Cell::from(if *title == "FRONTEND" { l } else { l.right_aligned() })
    }));
    head.push(Cell::from("IOPS HISTORY"));

    let mut rows = Vec::new();
    let mut selected_row = None;
    for e in exports {
        if app.selected.as_deref() == Some(e.name.as_str()) {
            selected_row = Some(rows.len());
        }
        let frontend = if e.connected { "attached" } else { "-" };
        let mut cells = vec![Cell::from(e.name.clone()), Cell::from(frontend)];
        cells.extend(rate_cells(&e.total, e.measured, app.model.timing));
        cells.push(Cell::from(spark(&e.iops_history, history_width)).fg(Color::Cyan));
        rows.push(Row::new(cells).bold());
        for (i, q) in e.queues.iter().enumerate() {
            let mut cells = vec![Cell::from(format!("  q{i}")), Cell::from("")];
            cells.extend(rate_cells(q, e.measured, app.model.timing));
            rows.push(Row::new(cells).dim());
        }
    }
    if rows.is_empty() && matches!(app.status, Status::Connected) {
        rows.push(Row::new([Cell::from("no exports (vblk ctl add NAME IMAGE --socket PATH)")]));
    }
    let table = Table::new(rows, widths)
        .header(Row::new(head).style(Style::new().add_modifier(Modifier::REVERSED)))
        .row_highlight_style(Style::new().fg(Color::Yellow))
        .column_spacing(1);
    let mut state = TableState::default().with_selected(selected_row);
    f.render_stateful_widget(table, area, &mut state);
}

/// The numeric cells of a row (blank before an export's second sample).
fn rate_cells(r: &Rates, measured: bool, timing: bool) -> Vec<Cell<'static>> {
    let cell = |s: String| Cell::from(Line::from(s).right_aligned());
    let rate = |v: f64, f: fn(f64) -> String| if measured { f(v) } else { "-".into() };
    let lat = |v: Option<f64>| if measured && timing { fmt_latency(v) } else { "-".into() };
    vec![
        cell(rate(r.read_iops, fmt_rate)),
        cell(rate(r.write_iops, fmt_rate)),
        cell(rate(r.read_bps, fmt_mbps)),
        cell(rate(r.write_bps, fmt_mbps)),
        cell(lat(r.p50)),
        cell(lat(r.p99)),
        cell(r.in_flight.to_string()),
        cell(rate(r.errors, fmt_rate)),
    ]
}

fn sparklines(f: &mut Frame, app: &App, e: &ExportView, area: Rect) {
    let [left, right] = Layout::horizontal([Constraint::Fill(1), Constraint::Fill(1)]).areas(area);
    let secs = app.interval.as_secs_f64();
    for (area, history, what, fmt) in
        [(left, &e.iops_history, "IOPS", fmt_rate as fn(f64) -> String), (right, &e.bps_history, "MB/s", fmt_mbps)]
    {
        let width = area.width.saturating_sub(2) as usize;
        let shown: Vec<u64> = history.iter().skip(history.len().saturating_sub(width)).copied().collect();
        let max = shown.iter().copied().max().unwrap_or(0);
        let title = format!(
            " {} {what}, last {} s: now {}, max {} ",
            e.name,
            fmt_secs(shown.len() as f64 * secs),
            fmt(shown.last().copied().unwrap_or(0) as f64),
            fmt(max as f64)
        );
        let spark = Sparkline::default().block(Block::bordered().title(title)).data(&shown).fg(Color::Cyan);
        f.render_widget(spark, area);
    }
}

fn fmt_secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.0}")
    }
}
