"""The dashboard cannot be turned into stored XSS by a federation's name or error.

Static checks on the page and script, and (when `node` is installed) the real script run
against a small stub DOM that throws on any HTML sink, fed hostile federation data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from coordinator.dashboard import DASHBOARD_CSS, DASHBOARD_HTML, DASHBOARD_JS, SECURITY_HEADERS

HOSTILE = '<img src=x onerror="alert(document.cookie)"></h2><script>steal()</script>'


@pytest.mark.parametrize("sink", [
    "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
    "new Function", "setTimeout('", 'setTimeout("',  # string-evaluating timers
    "localStorage",                                  # the token stays in sessionStorage
])
def test_script_uses_no_html_sink(sink: str) -> None:
    assert sink not in DASHBOARD_JS


def test_page_has_no_inline_script_handlers_or_style_attributes() -> None:
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", DASHBOARD_HTML, flags=re.S | re.I)
    assert scripts == [(' src="/dashboard.js" defer', "")]
    assert not re.search(r"\son\w+\s*=", DASHBOARD_HTML, flags=re.I)
    assert not re.search(r"\sstyle\s*=", DASHBOARD_HTML, flags=re.I)
    assert "javascript:" not in DASHBOARD_HTML.lower()


def test_csp_is_strict_and_allows_exactly_the_page_style() -> None:
    csp = dict(d.strip().split(" ", 1) for d in SECURITY_HEADERS["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'" and csp["form-action"] == "'none'"
    assert "unsafe" not in SECURITY_HEADERS["Content-Security-Policy"]
    # the one <style> block matches the hash the policy allows
    (style,) = re.findall(r"<style>(.*?)</style>", DASHBOARD_HTML, flags=re.S)
    assert style == DASHBOARD_CSS
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert csp["style-src"] == f"'self' 'sha256-{digest}'"
    assert SECURITY_HEADERS["X-Content-Type-Options"] == "nosniff"
    assert SECURITY_HEADERS["X-Frame-Options"] == "DENY"
    assert SECURITY_HEADERS["Referrer-Policy"] == "no-referrer"


# A stub DOM: text only through text nodes; every HTML sink and on* attribute throws.
_STUB_DOM = r"""
'use strict';
const created = [];
class N { constructor() { this.children = []; }
  append(...cs) { for (const c of cs) { if (!(c instanceof N)) throw new Error('append of a string'); this.children.push(c); } }
  replaceChildren(...cs) { this.children = []; this.append(...cs); }
  get textContent() { return this.children.map(c => c.textContent).join(''); }
  set textContent(t) { this.children = [new T(String(t))]; } }
class T extends N { constructor(t) { super(); this.data = t; } get textContent() { return this.data; } }
class E extends N {
  constructor(tag) { super(); this.tag = tag; this.attrs = {}; this.on = {}; this.value = ''; created.push(tag); }
  setAttribute(k, v) { if (/^on/i.test(k) || k === 'style') throw new Error('attribute ' + k); this.attrs[k] = v; }
  addEventListener(type, f) { this.on[type] = f; }
  set innerHTML(_) { throw new Error('innerHTML'); } set outerHTML(_) { throw new Error('outerHTML'); }
  insertAdjacentHTML() { throw new Error('insertAdjacentHTML'); } }
const ids = {tok: new E('input'), feds: new E('div'), agents: new E('div'), err: new E('span'), show: new E('button'),
  updated: new E('span')};
const store = {}, calls = [];
const define = (name, value) => Object.defineProperty(globalThis, name, {value, configurable: true, writable: true});
define('Node', N);
define('document', {getElementById: id => ids[id], createElement: t => new E(t), createElementNS: (ns, t) => new E(t),
  createTextNode: t => new T(t), write() { throw new Error('document.write'); }});
define('sessionStorage', {getItem: k => store[k] ?? null, setItem: (k, v) => { store[k] = String(v); }});
define('localStorage', new Proxy({}, {get() { throw new Error('localStorage'); }}));
define('setInterval', () => 0);
define('fetch', async (path, opts) => { calls.push([path, opts.headers.Authorization]);
  return {ok: true, status: 200, json: async () => DATA[path]}; });
"""

_DRIVER = r"""
ids.tok.value = 'tok-123';
ids.show.on.click();
setTimeout(() => {
  const h2 = [];
  const walk = n => { if (n.tag === 'h2') h2.push(n.textContent); (n.children || []).forEach(walk); };
  walk(ids.feds);
  console.log(JSON.stringify({h2, err: ids.err.textContent, text: ids.feds.textContent, agents: ids.agents.textContent,
                              created, calls, store}));
}, 100);
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_script_renders_hostile_names_as_text(tmp_path: Path) -> None:
    # Arrange: a federation whose name, error and id are markup
    fid = "f/../<b>"
    data = {
        "/v1/agents": [{"id": "a1", "name": HOSTILE, "enrolled_at": 0, "last_seen": 0, "status": "online",
                        "memory_budget_bytes": 2**20, "needs_bytes": {fid: 2**21}}],
        "/v1/federations": [{"id": fid, "status": "failed", "current_round": 1, "error": HOSTILE,
                             "config": {"name": HOSTILE, "rounds": 3, "strategy": {"name": "fedavg"}}}],
        "/v1/federations/f%2F..%2F%3Cb%3E/rounds": [
            {"round": 1, "accuracy": 0.5, "loss": 1.25, "participants": 2, "bytes_up": 2048,
             "bytes_down": 0, "seconds": 1.5}],
    }
    script = tmp_path / "run.js"
    script.write_text(f"const DATA = {json.dumps(data)};\n{_STUB_DOM}\n{DASHBOARD_JS}\n{_DRIVER}")

    # Act
    done = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=30)

    # Assert: it ran, the markup is text, no element came from the data, token in session
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    assert page["err"] == ""
    assert page["h2"] == [f"{HOSTILE} ({fid}, failed, round 1/3, strategy fedavg)"]
    assert "error: " + HOSTILE in page["text"] and "0.5000" in page["text"]
    assert HOSTILE in page["agents"]  # the agent's name (bounded by the protocol, but still text)
    assert not {"img", "script", "b"} & set(page["created"])
    assert page["store"] == {"fedslim-token": "tok-123"}
    assert [c[1] for c in page["calls"]] == ["Bearer tok-123"] * 3  # agents, federations, rounds
