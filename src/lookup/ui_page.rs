//! The status page's HTML: one server-rendered document, an inline SVG chart, a style sheet
//! in the page, no script (the page reloads itself with `<meta http-equiv="refresh">`), a
//! layout that folds to one column on a phone. Everything shown from the journal is escaped.

use std::fmt::Write;
use std::path::Path;

use crate::journal::{FileRow, OutboxFigures, State, Summary};
use crate::util::human::{human_age, human_bytes};

/// Seconds between the page's reloads.
pub const REFRESH_SECS: u32 = 15;

/// What the page shows.
pub struct PageData {
    pub node: String,
    pub now_ms: i64,
    pub summary: Summary,
    /// (minute start in ms, bytes, files) of the last hour.
    pub throughput: Vec<(i64, u64, u64)>,
    pub recent: Vec<FileRow>,
    pub failed: Vec<FileRow>,
    pub oldest: Option<FileRow>,
    pub query: Option<String>,
    pub search: Option<Vec<FileRow>>,
    /// Outbox figures per receiver (labels without queries).
    pub notify: Vec<OutboxFigures>,
    /// (label, events) per configured receiver.
    pub receivers: Vec<(String, String)>,
    pub last_stored_ms: Option<i64>,
    /// The latest error of a file still on its way: (message, when).
    pub store_error: Option<(String, i64)>,
    /// (free, size) of the root's file system.
    pub disk: Option<(u64, u64)>,
    /// The running daemon's disk forecast, once it has sampled the root's file system.
    pub disk_forecast: Option<crate::service::disk::DiskReport>,
    /// Why the daemon is unhealthy (`None`: healthy).
    pub health: Option<String>,
    /// The session token of a client that may act (see `super::ui`).
    pub session: Option<String>,
    /// The result of the last action, shown once.
    pub notice: Option<String>,
}

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn age(now_ms: i64, at_ms: i64) -> String {
    human_age(((now_ms - at_ms).max(0) / 1000) as u64)
}

fn time(at_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(at_ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

const STYLE: &str = "
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:.6em 1em;display:flex;flex-wrap:wrap;gap:.5em 1.5em;align-items:baseline}
header h1{font-size:1.15em;margin:0}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,26em),1fr));gap:1em;padding:1em}
section{background:#fff;border-radius:6px;padding:.8em 1em;box-shadow:0 1px 2px #0002;overflow-x:auto}
section.wide{grid-column:1/-1}
h2{font-size:1em;margin:0 0 .5em}
table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:.2em .5em .2em 0;vertical-align:top}
td.n,th.n{text-align:right}
td.p{word-break:break-all}
.ok{color:#17803d}.bad{color:#b42318}.muted{color:#667}
.notice{background:#fff6d5;padding:.5em 1em;margin:1em 1em 0;border-radius:6px}
form.s{display:flex;gap:.5em}form.s input[type=search]{flex:1;min-width:0;font:inherit;padding:.3em}
button{font:inherit}
svg{width:100%;height:auto;display:block}
";

/// Renders the page; `link` gives a file's drop-in URL path.
pub fn render(d: &PageData, link: &dyn Fn(&Path) -> String) -> String {
    let mut h = String::with_capacity(32 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=refresh content=\"{REFRESH_SECS}\">\
         <link rel=icon href=\"data:,\">\
         <title>record-offload · {node}</title><style>{STYLE}</style></head><body>\
         <header><h1>record-offload · {node}</h1><span>{now}</span>{health}</header>",
        node = esc(&d.node),
        now = esc(&time(d.now_ms)),
        health = match &d.health {
            None => "<span class=ok id=health>healthy</span>".to_string(),
            Some(why) => format!("<span class=bad id=health>unhealthy: {}</span>", esc(why)),
        },
    );
    if let Some(n) = &d.notice {
        let _ = write!(h, "<p class=notice id=notice>{}</p>", esc(n));
    }
    h.push_str("<main>");
    counts(&mut h, d);
    waiting(&mut h, d, link);
    chart(&mut h, d);
    search(&mut h, d, link);
    files_table(
        &mut h,
        "Recent uploads",
        "recent",
        &d.recent,
        d.now_ms,
        link,
    );
    failed(&mut h, d, link);
    health(&mut h, d);
    h.push_str("</main></body></html>");
    h
}

fn counts(h: &mut String, d: &PageData) {
    h.push_str("<section><h2>Files by state</h2><table id=counts><tr><th>state<th class=n>files<th class=n>bytes</tr>");
    for st in State::ALL {
        let n = d.summary.counts.get(st.as_str()).copied().unwrap_or(0);
        let b = d.summary.bytes.get(st.as_str()).copied().unwrap_or(0);
        let _ = write!(
            h,
            "<tr data-state={s}><td>{s}<td class=n>{n}<td class=n>{b}</tr>",
            s = st.as_str(),
            b = human_bytes(b)
        );
    }
    h.push_str("</table></section>");
}

fn waiting(h: &mut String, d: &PageData, link: &dyn Fn(&Path) -> String) {
    let _ = write!(
        h,
        "<section><h2>Waiting</h2><p>Bytes waiting: <b id=bytes-waiting>{}</b></p>",
        human_bytes(d.summary.bytes_waiting)
    );
    match &d.oldest {
        Some(r) => {
            let _ = write!(
                h,
                "<p>Oldest waiting: <a href=\"{}\">{}</a> ({}, {} old, {})</p>",
                esc(&link(&r.path)),
                esc(&r.path.to_string_lossy()),
                r.state.as_str(),
                age(d.now_ms, r.discovered_ms),
                human_bytes(r.size)
            );
        }
        None => h.push_str("<p class=muted>Nothing waits.</p>"),
    }
    h.push_str("</section>");
}

/// Bytes stored per minute over the last hour, as bars.
fn chart(h: &mut String, d: &PageData) {
    const W: i64 = 600;
    const HT: i64 = 160;
    let start = d.now_ms - 3_600_000;
    let max = d.throughput.iter().map(|t| t.1).max().unwrap_or(0);
    let total: u64 = d.throughput.iter().map(|t| t.1).sum();
    let files: u64 = d.throughput.iter().map(|t| t.2).sum();
    let _ = write!(
        h,
        "<section class=wide><h2>Stored in the last hour: {} in {} files</h2>\
         <svg id=chart viewBox=\"0 0 {W} {}\" role=img aria-label=\"bytes stored per minute\">\
         <line x1=0 y1={HT} x2={W} y2={HT} stroke=#99a />",
        human_bytes(total),
        files,
        HT + 18
    );
    if max > 0 {
        let bar_w = W as f64 / 60.0;
        for (at, bytes, n) in &d.throughput {
            let minute = ((at - start) / 60_000).clamp(0, 59);
            let hgt = ((*bytes as f64 / max as f64) * (HT - 4) as f64).max(1.0);
            let _ = write!(
                h,
                "<rect class=bar x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=#3a6fd8>\
                 <title>{} in {} files, {}</title></rect>",
                minute as f64 * bar_w + 1.0,
                HT as f64 - hgt,
                bar_w - 2.0,
                hgt,
                human_bytes(*bytes),
                n,
                esc(&time(*at))
            );
        }
        let _ = write!(
            h,
            "<text x=2 y=12 font-size=11 fill=#556>{}/min</text>",
            human_bytes(max)
        );
    }
    let _ = write!(
        h,
        "<text x=0 y={y} font-size=11 fill=#556>-60 min</text>\
         <text x={W} y={y} font-size=11 fill=#556 text-anchor=end>now</text></svg></section>",
        y = HT + 15
    );
}

fn search(h: &mut String, d: &PageData, link: &dyn Fn(&Path) -> String) {
    let hidden = d
        .session
        .as_ref()
        .map(|s| format!("<input type=hidden name=s value=\"{}\">", esc(s)))
        .unwrap_or_default();
    let _ = write!(
        h,
        "<section class=wide><h2>Search by path</h2>\
         <form class=s method=get action=/ui role=search>{hidden}\
         <input type=search name=q id=q value=\"{}\" placeholder=\"part of a path, or /record/...\">\
         <button type=submit>Search</button></form>",
        esc(d.query.as_deref().unwrap_or(""))
    );
    if let Some(rows) = &d.search {
        let _ = write!(h, "<p id=search-count>{} found</p>", rows.len());
        h.push_str("<table id=search-results><tr><th>path<th>state<th class=n>size<th>key</tr>");
        for r in rows {
            let _ = write!(
                h,
                "<tr><td class=p><a href=\"{}\">{}</a><td>{}<td class=n>{}<td class=p>{}</tr>",
                esc(&link(&r.path)),
                esc(&r.path.to_string_lossy()),
                r.state.as_str(),
                human_bytes(r.size),
                esc(&r.key)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
}

fn files_table(
    h: &mut String,
    title: &str,
    id: &str,
    rows: &[FileRow],
    now_ms: i64,
    link: &dyn Fn(&Path) -> String,
) {
    let _ = write!(
        h,
        "<section class=wide><h2>{title}</h2><table id={id}><tr><th>path<th class=n>size<th>stored</tr>"
    );
    if rows.is_empty() {
        h.push_str("<tr><td class=muted colspan=3>none yet</tr>");
    }
    for r in rows {
        let at = r.uploaded_ms.unwrap_or(r.updated_ms);
        let _ = write!(
            h,
            "<tr><td class=p><a href=\"{}\">{}</a><td class=n>{}<td title=\"{}\">{} ago</tr>",
            esc(&link(&r.path)),
            esc(&r.path.to_string_lossy()),
            human_bytes(r.size),
            esc(&time(at)),
            age(now_ms, at)
        );
    }
    h.push_str("</table></section>");
}

fn failed(h: &mut String, d: &PageData, link: &dyn Fn(&Path) -> String) {
    h.push_str("<section class=wide><h2>Failed files</h2><table id=failed><tr><th>path<th>last error<th>when");
    if d.session.is_some() {
        h.push_str("<th>");
    }
    h.push_str("</tr>");
    if d.failed.is_empty() {
        h.push_str("<tr><td class=muted colspan=3>none</tr>");
    }
    for r in &d.failed {
        let _ = write!(
            h,
            "<tr><td class=p><a href=\"{}\">{}</a><td class=p>{}<td>{} ago",
            esc(&link(&r.path)),
            esc(&r.path.to_string_lossy()),
            esc(r.last_error.as_deref().unwrap_or("")),
            age(d.now_ms, r.last_error_ms.unwrap_or(r.updated_ms))
        );
        if let Some(s) = &d.session {
            let _ = write!(
                h,
                "<td><form method=post action=\"/ui/requeue?id={}&amp;s={}\">\
                 <button type=submit class=requeue>re-queue</button></form>",
                r.id,
                esc(&enc(s))
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
    if d.session.is_none() && !d.failed.is_empty() {
        h.push_str(
            "<p class=muted>Re-queue is offered on the unix socket and to signed requests.</p>",
        );
    }
    h.push_str("</section>");
}

fn health(h: &mut String, d: &PageData) {
    h.push_str("<section><h2>Store</h2><p>primary: ");
    match d.last_stored_ms {
        Some(at) => {
            let _ = write!(h, "last file stored {} ago", age(d.now_ms, at));
        }
        None => h.push_str("nothing stored yet"),
    }
    h.push_str("</p>");
    if let Some((e, at)) = &d.store_error {
        let _ = write!(
            h,
            "<p>Latest error ({} ago): <span class=bad>{}</span></p>",
            age(d.now_ms, *at),
            esc(e)
        );
    }
    h.push_str("<h2>Disk</h2>");
    match d.disk {
        Some((free, size)) => {
            let _ = write!(
                h,
                "<p>{} free of {}</p>",
                human_bytes(free),
                human_bytes(size)
            );
        }
        None => h.push_str("<p class=muted>free space unknown</p>"),
    }
    match &d.disk_forecast {
        Some(r) => match (r.full_in_secs, r.fill_rate_bytes_per_sec) {
            (Some(s), Some(rate)) => {
                let _ = write!(
                    h,
                    "<p id=forecast{}>forecast full in {} (filling at {}/s)</p>",
                    if r.warning { " class=bad" } else { "" },
                    human_age(s as u64),
                    human_bytes(rate.max(0.0) as u64)
                );
            }
            _ => h.push_str("<p class=ok id=forecast>not filling</p>"),
        },
        None => h.push_str("<p class=muted id=forecast>no disk forecast yet</p>"),
    }
    h.push_str("</section><section><h2>Notifications</h2>");
    if d.receivers.is_empty() {
        h.push_str("<p class=muted>No [[notify]] receivers.</p>");
    } else {
        h.push_str("<table id=notify><tr><th>receiver<th class=n>backlog<th>oldest<th>state</tr>");
        for (label, events) in &d.receivers {
            let f = d.notify.iter().find(|f| &f.url == label);
            let (backlog, oldest, state) = match f {
                Some(f) if f.backlog > 0 => (
                    f.backlog,
                    human_age(f.oldest_secs),
                    match &f.last_error {
                        Some(e) => format!(
                            "<span class=bad>retrying ({} attempts): {}</span>",
                            f.head_attempts,
                            esc(e)
                        ),
                        None => "<span class=ok>sending</span>".to_string(),
                    },
                ),
                _ => (
                    0,
                    "-".to_string(),
                    "<span class=ok>up to date</span>".to_string(),
                ),
            };
            let _ = write!(
                h,
                "<tr><td class=p>{}<br><span class=muted>{}</span><td class=n>{backlog}<td>{oldest}<td>{state}</tr>",
                esc(label),
                esc(events)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            esc("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }
}
