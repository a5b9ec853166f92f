"""The dashboard (no build step): federations with a live view of the round in flight,
per-round charts (accuracy, loss, MB up/down, density, MACs, agent memory peak vs budget),
agents with a revoke button, and export downloads. Refreshes itself every 2 s.

Federation and agent names and errors are attacker-controlled text, so the script builds
the page with createElement/textContent only (never HTML from data), and the page runs
under a strict Content-Security-Policy: the script is a separate file (`/dashboard.js`),
the one `<style>` block is allowed by its hash, no inline handlers or style attributes.
The charts are hand-written SVG (about 30 lines: smaller than any vendored library, and
they stay inside `script-src 'self'`). The admin token lives in sessionStorage (gone with
the tab), not localStorage; export downloads go through fetch with the token (a plain
link could not carry it) and a short-lived blob: URL.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["DASHBOARD_CSS", "DASHBOARD_HTML", "DASHBOARD_JS", "SECURITY_HEADERS"]

DASHBOARD_CSS = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}input{width:22em}.fed{margin-bottom:2em}.chart{border:1px solid #ddd;margin:0 6px 6px 0}
.chart text{font-size:10px;fill:#444}.chart .ct{font-size:11px;font-weight:600}
.charts{display:flex;flex-wrap:wrap}.live{margin:.5em 0;padding:.5em;background:#f5f9ff;border:1px solid #cfe0f7}
.err{color:#b00020}#updated{color:#777;margin-left:1em}
"""

DASHBOARD_HTML = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedslim coordinator</title>
<style>{DASHBOARD_CSS}</style>
<script src="/dashboard.js" defer></script></head><body>
<h1>fedslim coordinator</h1>
<p>Admin token: <input id="tok" type="password" autocomplete="off"> <button id="show" type="button">Show</button>
<span id="updated"></span> <span id="err" class="err"></span></p>
<div id="feds"></div>
<div id="agents"></div>
</body></html>
"""

DASHBOARD_JS = r"""'use strict';
(() => {
  const KEY = 'fedslim-token';
  const NS = 'http://www.w3.org/2000/svg';
  const REFRESH_MS = 2000;
  const tok = document.getElementById('tok');
  const out = document.getElementById('feds');
  const agentsOut = document.getElementById('agents');
  const err = document.getElementById('err');
  const stamp = document.getElementById('updated');
  tok.value = sessionStorage.getItem(KEY) || '';
  const armed = new Set();  // agents whose revoke button was clicked once (the second click revokes)
  let countdowns = [];      // [span, local deadline in ms], ticked every second between refreshes
  let busy = false;

  // el('td', {class: 'x'}, 'text', child): text always goes in as a text node
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.append(document.createTextNode(String(text)));
    return node;
  }
  const num = v => typeof v === 'number' && isFinite(v);
  const fixed = (v, d) => (num(v) ? v.toFixed(d) : '-');
  const mb = v => (num(v) ? v / 1048576 : null);
  const short = v => (Math.abs(v) >= 1e6 ? (v / 1e6).toFixed(1) + 'M' : Math.abs(v) >= 100 ? v.toFixed(0)
    : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3));

  async function call(method, path) {
    const r = await fetch(path, {method, headers: {Authorization: 'Bearer ' + tok.value}, cache: 'no-store'});
    if (!r.ok) throw new Error(path + ': ' + r.status + (r.status === 401 ? ' (admin token refused)' : ''));
    return r;
  }
  const get = async path => (await call('GET', path)).json();

  // One line chart per metric: rows are rounds, series [{label, color, values}] (null = no value).
  function chart(key, title, rows, series) {
    const W = 300, H = 130, L = 46, R = 8, T = 22, B = 18;
    const box = svg('svg', {width: W, height: H, class: 'chart', 'data-chart': key, role: 'img'});
    box.append(svg('rect', {x: 0, y: 0, width: W, height: H, fill: '#ffffff'}), svg('text', {x: 6, y: 14, class: 'ct'}, title));
    const all = series.flatMap(s => s.values.filter(num));
    if (!all.length) { box.append(svg('text', {x: L, y: H / 2}, 'no data yet')); return box; }
    let lo = Math.min(...all), hi = Math.max(...all);
    if (hi - lo < 1e-12) { const pad = Math.abs(hi) * 0.1 || 1; lo -= pad; hi += pad; }
    const n = rows.length;
    const x = i => L + (n > 1 ? i / (n - 1) : 0.5) * (W - L - R);
    const y = v => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    box.append(svg('polyline', {points: `${L},${T} ${L},${H - B} ${W - R},${H - B}`, fill: 'none', stroke: '#999999'}),
      svg('text', {x: L - 4, y: T + 4, 'text-anchor': 'end'}, short(hi)),
      svg('text', {x: L - 4, y: H - B, 'text-anchor': 'end'}, short(lo)),
      svg('text', {x: L, y: H - 4}, 'round ' + rows[0].round),
      svg('text', {x: W - R, y: H - 4, 'text-anchor': 'end'}, String(rows[n - 1].round)));
    series.forEach((s, k) => {
      const pts = s.values.map((v, i) => (num(v) ? [x(i), y(v)] : null)).filter(p => p);
      box.append(svg('polyline', {points: pts.map(p => p.join(',')).join(' '), fill: 'none', stroke: s.color, 'stroke-width': 2}));
      for (const [px, py] of pts) box.append(svg('circle', {cx: px, cy: py, r: 2.5, fill: s.color}));
      box.append(svg('text', {x: W - R, y: 14 + 11 * k, 'text-anchor': 'end', fill: s.color}, s.label));
    });
    return box;
  }

  function charts(rows) {
    const col = k => rows.map(r => (num(r[k]) ? r[k] : null));
    return el('div', {class: 'charts'},
      chart('accuracy', 'test accuracy', rows, [{label: 'accuracy', color: '#1565c0', values: col('accuracy')}]),
      chart('loss', 'loss', rows, [{label: 'test', color: '#c62828', values: col('loss')},
                                   {label: 'train', color: '#ef6c00', values: col('train_loss')}]),
      chart('traffic', 'MB per round', rows, [{label: 'up', color: '#2e7d32', values: rows.map(r => mb(r.bytes_up))},
                                              {label: 'down', color: '#6a1b9a', values: rows.map(r => mb(r.bytes_down))}]),
      chart('density', 'weight density', rows, [{label: 'density', color: '#00838f', values: col('density')}]),
      chart('macs', 'MACs (millions)', rows, [{label: 'MACs', color: '#4e342e', values: rows.map(r => (num(r.macs) ? r.macs / 1e6 : null))}]),
      chart('memory', 'agent memory (MB)', rows, [{label: 'peak', color: '#ad1457', values: col('agent_peak_mb')},
                                                  {label: 'budget', color: '#455a64', values: col('agent_budget_mb')}]));
  }

  function liveView(f, live, names) {
    const box = el('div', {class: 'live', 'data-live': f.id});
    if (!live || live.round == null) {
      box.append(f.status === 'running' ? 'no round open: waiting for enough online agents' : 'no round in flight (' + f.status + ')');
      return box;
    }
    const left = el('span', {class: 'countdown'}, Math.ceil(live.seconds_left) + ' s');
    countdowns.push([left, Date.now() + live.seconds_left * 1000]);
    box.append(el('strong', {}, `round ${live.round} in flight`), ` (attempt ${live.attempt}): `,
      el('span', {class: 'received'}, `${live.received}/${live.expected}`), ' updates received',
      live.declined ? `, ${live.declined} declined` : '', ', deadline in ', left, ' ',
      el('progress', {max: Math.max(live.expected, 1), value: live.received + live.declined}));
    if (live.waiting_for.length) {
      const late = live.seconds_left <= 0;
      box.append(el('div', {class: late ? 'err' : ''}, (late ? 'stragglers: ' : 'waiting for: ') +
        live.waiting_for.map(a => names.get(a) || a).join(', ')));
    }
    return box;
  }

  async function download(path, filename) {
    const blob = await (await call('GET', path)).blob();
    const url = URL.createObjectURL(blob);
    const a = el('a', {href: url, download: filename});
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
  function exportButtons(f) {
    const base = '/v1/federations/' + encodeURIComponent(f.id) + '/export/';
    const b = (label, path, file) => {
      const btn = el('button', {type: 'button', 'data-export': file}, label);
      btn.addEventListener('click', () => download(base + path, file).catch(e => { err.textContent = e.message; }));
      return btn;
    };
    return el('p', {}, 'export: ', b('ONNX model', 'model.onnx', 'model.onnx'), ' ', b('report (JSON)', 'report', 'export_report.json'));
  }

  function federation(f, rows, live, names) {
    const c = f.config || {};
    const title = el('h2', {}, String(c.name ?? ''), ' ',
      el('small', {}, `(${f.id}, ${f.status}, round ${f.current_round}/${c.rounds}, strategy ${c.strategy && c.strategy.name})`));
    const box = el('div', {class: 'fed', 'data-federation': f.id}, title);
    if (f.error) box.append(el('p', {class: 'err'}, 'error: ' + f.error));
    if (live !== null) box.append(liveView(f, live, names));
    if (rows.length) box.append(charts(rows));
    const head = ['round', 'accuracy', 'loss', 'participants', 'stragglers', 'KB up', 'KB down', 'density', 'MACs', 'peak MB', 's'];
    const table = el('table', {}, el('tr', {}, ...head.map(t => el('th', {}, t))));
    for (const r of rows) {
      table.append(el('tr', {},
        ...[r.round, fixed(r.accuracy, 4), fixed(r.loss, 3), r.participants, r.stragglers, fixed(r.bytes_up / 1024, 0),
            fixed(r.bytes_down / 1024, 0), fixed(r.density, 3), num(r.macs) ? fixed(r.macs / 1e6, 2) + 'M' : '-',
            fixed(r.agent_peak_mb, 1), fixed(r.seconds, 1)].map(v => el('td', {}, v ?? '-'))));
    }
    box.append(table);
    if (f.current_round > 0) box.append(exportButtons(f));
    return box;
  }

  function revokeButton(a) {
    const btn = el('button', {type: 'button', 'data-revoke': a.id}, armed.has(a.id) ? 'confirm revoke' : 'revoke');
    btn.addEventListener('click', () => {
      if (!armed.has(a.id)) { armed.add(a.id); btn.textContent = 'confirm revoke'; return; }
      armed.delete(a.id);
      call('DELETE', '/v1/agents/' + encodeURIComponent(a.id)).then(load, e => { err.textContent = e.message; });
    });
    return btn;
  }

  function agentsTable(agents, fedNames) {
    const now = Date.now() / 1000;
    const head = ['name', 'id', 'status', 'last seen', 'budget MB', 'level/width', 'needs MB', ''];
    const table = el('table', {class: 'agents'}, el('tr', {}, ...head.map(t => el('th', {}, t))));
    for (const a of agents) {
      const needs = Object.entries(a.needs_bytes || {}).map(([f, n]) => (fedNames.get(f) || f) + ': ' + fixed(mb(n), 1));
      const widths = Object.entries(a.widths || {}).map(([f, w]) => (fedNames.get(f) || f) + ': ' + w);
      table.append(el('tr', {'data-agent': a.id},
        ...[a.name, a.id, a.status, fixed(now - a.last_seen, 0) + ' s ago', fixed(mb(a.memory_budget_bytes), 1),
            widths.join(', ') || '-', needs.join(', ') || '-'].map(v => el('td', {}, v ?? '-')),
        el('td', {}, a.status === 'revoked' ? '' : revokeButton(a))));
    }
    return el('div', {}, el('h2', {}, `Agents (${agents.length})`), table);
  }

  async function load() {
    if (busy) return;
    busy = true;
    err.textContent = '';
    try {
      const agents = await get('/v1/agents') || [];
      const names = new Map(agents.map(a => [a.id, a.name]));
      const feds = await get('/v1/federations');
      const fedNames = new Map(feds.map(f => [f.id, String((f.config || {}).name ?? f.id)]));
      const boxes = [];
      countdowns = [];
      for (const f of feds) {
        const path = '/v1/federations/' + encodeURIComponent(f.id);
        const rows = await get(path + '/rounds');
        const live = f.status === 'running' || f.status === 'paused' ? await get(path + '/live') : null;
        boxes.push(federation(f, rows, live, names));
      }
      out.replaceChildren(...(boxes.length ? boxes : [el('p', {}, 'No federations yet.')]));
      agentsOut.replaceChildren(agentsTable(agents, fedNames));
      stamp.textContent = 'updated ' + new Date().toLocaleTimeString();
    } catch (e) {
      err.textContent = e.message;
    } finally {
      busy = false;
    }
  }
  function tick() {
    for (const [span, end] of countdowns) span.textContent = Math.max(0, Math.ceil((end - Date.now()) / 1000)) + ' s';
  }

  function save() { sessionStorage.setItem(KEY, tok.value); load(); }
  document.getElementById('show').addEventListener('click', save);
  tok.addEventListener('keydown', e => { if (e.key === 'Enter') save(); });
  if (tok.value) load();
  setInterval(() => { if (tok.value) load(); }, REFRESH_MS);
  setInterval(tick, 1000);
})();
"""

# The one inline <style> is allowed by its hash, so style-src needs no 'unsafe-inline'.
_STYLE_HASH = base64.b64encode(hashlib.sha256(DASHBOARD_CSS.encode()).digest()).decode()

# For `/` and `/dashboard.js` (app.py). connect-src 'self' covers the API's fetches;
# img-src blob: is not needed for downloads (a navigation, not an image load).
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; connect-src 'self'; "
        f"style-src 'self' 'sha256-{_STYLE_HASH}'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
