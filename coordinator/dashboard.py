"""A one-page dashboard (no build step): federations, per-round metrics, accuracy plot.

Federation names and errors are attacker-controlled text, so the script builds the page
with createElement/textContent only (never HTML from data), and the page can run under a
strict Content-Security-Policy: the script is a separate file (`/dashboard.js`), the one
`<style>` block is allowed by its hash, no inline handlers or style attributes. The admin
token lives in sessionStorage (gone with the tab), not localStorage.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["DASHBOARD_CSS", "DASHBOARD_HTML", "DASHBOARD_JS", "SECURITY_HEADERS"]

DASHBOARD_CSS = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}input{width:22em}.fed{margin-bottom:2em}.chart{border:1px solid #ddd}
.err{color:#b00020}
"""

DASHBOARD_HTML = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedslim coordinator</title>
<style>{DASHBOARD_CSS}</style>
<script src="/dashboard.js" defer></script></head><body>
<h1>fedslim coordinator</h1>
<p>Admin token: <input id="tok" type="password" autocomplete="off"> <button id="show" type="button">Show</button>
<span id="err" class="err"></span></p>
<div id="feds"></div>
</body></html>
"""

DASHBOARD_JS = r"""'use strict';
(() => {
  const KEY = 'fedslim-token';
  const tok = document.getElementById('tok');
  const out = document.getElementById('feds');
  const err = document.getElementById('err');
  tok.value = sessionStorage.getItem(KEY) || '';

  // el('td', {class: 'x'}, 'text', child): text always goes in as a text node
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  const fixed = (v, d) => (typeof v === 'number' && isFinite(v) ? v.toFixed(d) : '-');

  async function get(path) {
    const r = await fetch(path, {headers: {Authorization: 'Bearer ' + tok.value}, cache: 'no-store'});
    if (!r.ok) throw new Error(path + ': ' + r.status);
    return r.json();
  }

  function chart(rows) {
    const NS = 'http://www.w3.org/2000/svg', w = 420, h = 120;
    const svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('width', w + 10); svg.setAttribute('height', h + 10); svg.setAttribute('class', 'chart');
    const line = document.createElementNS(NS, 'polyline');
    const pts = rows.map((r, i) => {
      const acc = typeof r.accuracy === 'number' && isFinite(r.accuracy) ? r.accuracy : 0;
      return (i / Math.max(rows.length - 1, 1)) * w + ',' + (h - acc * h);
    });
    line.setAttribute('points', pts.join(' '));
    line.setAttribute('fill', 'none'); line.setAttribute('stroke', '#1565c0'); line.setAttribute('stroke-width', '2');
    svg.append(line);
    return svg;
  }

  function federation(f, rows) {
    const c = f.config || {};
    const title = el('h2', {}, String(c.name ?? ''), ' ',
      el('small', {}, `(${f.id}, ${f.status}, round ${f.current_round}/${c.rounds}, strategy ${c.strategy && c.strategy.name})`));
    const box = el('div', {class: 'fed'}, title);
    if (f.error) box.append(el('p', {class: 'err'}, 'error: ' + f.error));
    if (rows.length) box.append(chart(rows));
    const head = ['round', 'accuracy', 'loss', 'participants', 'KB up', 'KB down', 'MACs', 's'];
    const table = el('table', {}, el('tr', {}, ...head.map(t => el('th', {}, t))));
    for (const r of rows) {
      table.append(el('tr', {},
        ...[r.round, fixed(r.accuracy, 4), fixed(r.loss, 3), r.participants, fixed(r.bytes_up / 1024, 0),
            fixed(r.bytes_down / 1024, 0), typeof r.macs === 'number' ? fixed(r.macs / 1e6, 2) + 'M' : '-',
            fixed(r.seconds, 1)].map(v => el('td', {}, v ?? '-'))));
    }
    box.append(table);
    return box;
  }

  async function load() {
    err.textContent = '';
    try {
      const feds = await get('/v1/federations');
      const boxes = [];
      for (const f of feds) {
        boxes.push(federation(f, await get('/v1/federations/' + encodeURIComponent(f.id) + '/rounds')));
      }
      out.replaceChildren(...(boxes.length ? boxes : [el('p', {}, 'No federations yet.')]));
    } catch (e) {
      err.textContent = e.message;
    }
  }

  function save() { sessionStorage.setItem(KEY, tok.value); load(); }
  document.getElementById('show').addEventListener('click', save);
  tok.addEventListener('keydown', e => { if (e.key === 'Enter') save(); });
  if (tok.value) load();
  setInterval(() => { if (tok.value) load(); }, 5000);
})();
"""

# The one inline <style> is allowed by its hash, so style-src needs no 'unsafe-inline'.
_STYLE_HASH = base64.b64encode(hashlib.sha256(DASHBOARD_CSS.encode()).digest()).decode()

# For `/` and `/dashboard.js` (app.py). connect-src 'self' covers the API's fetches.
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
