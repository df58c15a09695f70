"""One self-contained interactive HTML page for a loss picture: opens offline, loads nothing.

The data goes in a ``<script type="application/json">`` block and a few lines of inline JS draw
the layer x token grid, so the file works from a USB stick or an air-gapped machine. Hovering a
cell shows the lens' top-k next tokens with probabilities; base / intervened / diff and the
metric are switchable.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from lens.analysis.picture import METRICS, LossPicture
from lens.artifacts.files import atomic_path


def html_payload(picture: LossPicture, unit: str = "nats") -> dict[str, Any]:
    """Everything the page shows: metric arrays per state and top-k as ``[vocab index, prob]`` pairs."""
    vocab_ids = sorted(picture.labels)
    index = {tid: i for i, tid in enumerate(vocab_ids)}
    summary = picture.summary(unit)
    states = ["base"] + (["intervened", "diff"] if picture.intervened is not None else [])
    top: dict[str, list] = {}
    for state, stats in (("base", picture.base), ("intervened", picture.intervened)):
        if stats is None:
            continue
        ids, probs = stats.top_ids.tolist(), stats.top_probs.tolist()  # [L+1][T][k]
        top[state] = [
            [[[index[i], round(p, 4)] for i, p in zip(cell_ids, cell_probs)] for cell_ids, cell_probs in zip(r_ids, r_probs)]
            for r_ids, r_probs in zip(ids, probs)
        ]
    return {
        "tokens": picture.tokens,
        "rows": {state: picture.row_labels(state) for state in states},
        "aligned": picture.aligned,
        "layerOf": [row.layer for row in picture.intervened.rows] if picture.intervened is not None else None,
        "unit": summary["unit"],
        "lens": picture.lens_kind,
        "states": states,
        "metrics": {m: {"label": METRICS[m], **{s: summary[s][m] for s in states}} for m in METRICS},
        "vocab": [picture.labels[i] for i in vocab_ids],
        "top": top,
    }


def write_html(picture: LossPicture, path: str | Path, unit: str = "nats", title: str = "") -> Path:
    """Write the interactive page for ``picture`` to ``path`` (atomically) and return the path."""
    return _write_page(PAGE, html_payload(picture, unit), path, title or f"loss picture ({picture.lens_kind} lens)")


def write_grid_html(grids: dict[str, dict[str, Any]], path: str | Path, title: str, note: str = "") -> Path:
    """A page of named grids, one shown at a time: each ``{"rows": [...], "cols": [...], "values":
    [rows][cols], "label": colour-bar label with unit}``, rows drawn bottom-up as in the PNGs; hovering
    a cell shows its row, column and value (None: no value, grey)."""
    return _write_page({**GRID_PAGE, "note": html.escape(note)}, {"grids": grids}, path, title)


def _write_page(template: dict[str, str], payload: dict[str, Any], path: str | Path, title: str) -> Path:
    path = Path(path)
    data = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    # Inside <script> only "</" could end the block; escaping <, > and & keeps the JSON valid and inert.
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = FRAME.replace("__STYLE__", template["style"]).replace("__CONTROLS__", template["controls"]).replace("__NOTE__", template["note"])
    page = page.replace("__SCRIPT__", template["script"]).replace("__COLOURS__", COLOURS)
    page = page.replace("__TITLE__", html.escape(title.replace("\n", "; "))).replace("__HEADING__", html.escape(title).replace("\n", "<br>"))
    page = page.replace("__DATA__", data)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


COLOURS = """const VIRIDIS = ["#440154","#482878","#3e4989","#31688e","#26828e","#1f9e89","#35b779","#6ece58","#b5de2b","#fde725"];
const DIVERGING = ["#2166ac","#67a9cf","#d1e5f0","#f7f7f7","#fddbc7","#ef8a62","#b2182b"];
function hex(c) { return [1, 3, 5].map(i => parseInt(c.slice(i, i + 2), 16)); }
function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  const a = hex(stops[i]), b = hex(stops[i + 1]);
  return "rgb(" + a.map((v, k) => Math.round(v + f * (b[k] - v))).join(",") + ")";
}"""
"""The colour maps every page draws with (viridis as in the PNGs, a red-blue diverging map)."""


FRAME = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; }
#controls label { margin-right: 12px; }
#grid { border-collapse: collapse; margin-top: 10px; }
#grid td.cell:hover { outline: 2px solid #e33; }
#legend { display: flex; align-items: center; gap: 8px; margin-top: 8px; }
#bar { width: 240px; height: 12px; border: 1px solid #999; }
.muted { color: #666; }
__STYLE__</style></head>
<body>
<h3>__HEADING__</h3>
__CONTROLS__<div id="legend"><span id="lo"></span><div id="bar"></div><span id="hi"></span><span id="unit" class="muted"></span></div>
<p class="muted">__NOTE__</p>
<table id="grid"></table>
<div id="tip"></div>
<script type="application/json" id="lens-data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("lens-data").textContent);
__COLOURS__
__SCRIPT__</script>
</body></html>
"""
"""What every page shares: no network (the CSP), its data inline as JSON, the colour bar, the grid and the tooltip."""

PAGE = {
    "style": """#grid td.cell { width: 46px; min-width: 46px; height: 16px; font-size: 9px; text-align: center; overflow: hidden;
  white-space: nowrap; max-width: 46px; cursor: crosshair; padding: 0 1px; }
#grid th.layer { font-weight: normal; text-align: right; padding-right: 6px; font-size: 10px; }
#grid th.tok { font-weight: normal; font-size: 11px; writing-mode: vertical-rl; transform: rotate(180deg);
  text-align: left; padding: 4px 0; white-space: pre; }
#tip { position: fixed; display: none; background: #fff; border: 1px solid #888; padding: 6px 8px;
  box-shadow: 2px 2px 6px rgba(0,0,0,.25); pointer-events: none; font-size: 12px; z-index: 10; }
#tip table { border-collapse: collapse; } #tip td { padding: 0 6px; white-space: pre; }
""",
    "controls": """<div id="controls">
  <span id="modes"></span>
  <label>metric <select id="metric"></select></label>
</div>
""",
    "note": """Row: the lens on a residual, read as the layer (residual after n blocks) it stands for; column t: input
token t, the cell scores the prediction of token t+1. In the difference, rows are aligned by layer and a layer the
intervention removed is a grey gap. Hover a cell for the top-k predicted tokens.""",
    "script": """let mode = D.states.includes("diff") ? "diff" : "base", metric = "ce";

function scale() {
  const m = D.metrics[metric];
  const vals = (mode === "diff" ? [m.diff] : D.states.filter(s => s !== "diff").map(s => m[s]))
    .flat(2).filter(v => v !== null);
  // 95th percentile, as in the PNGs: one extreme row or column must not wash out every other cell
  if (mode === "diff") { const a = Math.max(1e-6, pct(vals.map(Math.abs), 0.95)); return [-a, a]; }
  return [0, Math.max(1e-6, pct(vals, 0.95))];
}
function pct(vals, q) {
  const s = vals.slice().sort((a, b) => a - b);
  return s.length ? s[Math.floor(q * (s.length - 1))] : 0;
}
function top1(state, l, t) { return D.vocab[D.top[state][l][t][0][0]]; }
// the row of each state that shows what row l of the current mode shows (null: removed by the intervention)
function rowOf(state, l) {
  if (mode === "intervened") return state === "intervened" ? l : D.layerOf[l];
  return state === "intervened" ? D.aligned[l] : l;
}
function fmt(v) { return v === null ? "n/a" : v.toFixed(3); }

function render() {
  const grid = document.getElementById("grid"), m = D.metrics[metric], arr = m[mode];
  const [lo, hi] = scale(), stops = mode === "diff" ? DIVERGING : VIRIDIS;
  grid.replaceChildren();
  const rows = D.rows[mode];
  for (let l = rows.length - 1; l >= 0; l--) {
    const tr = grid.insertRow();
    const th = document.createElement("th"); th.className = "layer"; th.textContent = rows[l]; tr.appendChild(th);
    D.tokens.forEach((_, t) => {
      const td = tr.insertCell(), v = arr[l][t], u = v === null ? null : (v - lo) / (hi - lo);
      td.className = "cell"; td.dataset.layer = l; td.dataset.token = t;
      td.style.background = u === null ? "#b0b0b0" : ramp(stops, u);
      td.style.color = mode !== "diff" && u !== null && u < 0.6 ? "#fff" : "#000";
      if (mode === "diff") {
        const r = rowOf("intervened", l), label = r === null ? "" : top1("intervened", r, t);
        td.textContent = label === top1("base", l, t) ? "" : label;
      } else {
        td.textContent = top1(mode, l, t);
      }
    });
  }
  const tr = grid.insertRow(); tr.appendChild(document.createElement("th"));
  D.tokens.forEach(tok => { const th = document.createElement("th"); th.className = "tok"; th.textContent = tok; tr.appendChild(th); });
  document.getElementById("lo").textContent = (mode === "diff" ? "\u2264 " : "") + fmt(lo);
  document.getElementById("hi").textContent = "\u2265 " + fmt(hi);
  document.getElementById("bar").style.background = "linear-gradient(to right," + stops.join(",") + ")";
  document.getElementById("unit").textContent = m.label + (mode === "diff" ? ", intervened - base" : "") + " [" + D.unit + "]";
}

function topTable(state, l, t) {
  const r = rowOf(state, l);
  if (r === null || r === undefined) return "<td style='vertical-align:top'><b>" + state + "</b>: layer removed</td>";
  const rows = D.top[state][r][t].map(([i, p]) => "<tr><td>" + esc(D.vocab[i]) + "</td><td>" + p.toFixed(3) + "</td></tr>");
  return "<td style='vertical-align:top'><b>" + state + "</b> row " + esc(D.rows[state][r]) + " (" + D.metrics[metric].label + " " +
    fmt(D.metrics[metric][state][r][t]) + ")<table>" + rows.join("") + "</table></td>";
}
function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
function showTip(ev) {
  const td = ev.target.closest("td.cell"), tip = document.getElementById("tip");
  if (!td) { tip.style.display = "none"; return; }
  const l = +td.dataset.layer, t = +td.dataset.token;
  const next = t + 1 < D.tokens.length ? D.tokens[t + 1] : "(none)";
  const states = D.states.filter(s => s !== "diff");
  let head = "row " + esc(D.rows[mode][l]) + ", token " + t + " <b>" + esc(D.tokens[t]) + "</b> \u2192 actual next <b>" + esc(next) + "</b>";
  if (mode === "diff") head += "<br>difference " + fmt(D.metrics[metric].diff[l][t]) + " " + D.unit;
  tip.innerHTML = head + "<table><tr>" + states.map(s => topTable(s, l, t)).join("") + "</tr></table>";
  tip.style.display = "block";
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
  tip.style.top = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 4) + "px";
}

const modes = document.getElementById("modes");
D.states.forEach(s => {
  const label = document.createElement("label"), input = document.createElement("input");
  input.type = "radio"; input.name = "mode"; input.value = s; input.checked = s === mode;
  input.addEventListener("change", () => { mode = s; render(); });
  label.append(input, " " + s); modes.appendChild(label);
});
const select = document.getElementById("metric");
Object.keys(D.metrics).forEach(k => select.add(new Option(D.metrics[k].label, k)));
select.addEventListener("change", () => { metric = select.value; render(); });
document.getElementById("grid").addEventListener("mousemove", showTip);
document.getElementById("grid").addEventListener("mouseleave", () => { document.getElementById("tip").style.display = "none"; });
render();
""",
}
"""The loss-picture page: states and metrics to switch, top-k predictions on hover."""


GRID_PAGE = {
    "style": """#grid td.cell { width: 22px; min-width: 22px; height: 18px; cursor: crosshair; }
#grid th { font-weight: normal; font-size: 10px; white-space: pre; }
#grid th.row { text-align: right; padding-right: 6px; font-size: 11px; }
#tip { position: fixed; display: none; background: #fff; border: 1px solid #888; padding: 6px 8px;
  box-shadow: 2px 2px 6px rgba(0,0,0,.25); pointer-events: none; font-size: 12px; z-index: 10; white-space: pre; }
""",
    "controls": """<div id="controls"></div>
""",
    "note": """__NOTE__""",
    "script": """let name = Object.keys(D.grids)[0];

function render() {
  const g = D.grids[name], grid = document.getElementById("grid");
  const vals = g.values.flat().filter(v => v !== null);
  const lo = Math.min(...vals), hi = Math.max(lo + 1e-9, Math.max(...vals));
  grid.replaceChildren();
  for (let r = g.rows.length - 1; r >= 0; r--) {
    const tr = grid.insertRow();
    const th = document.createElement("th"); th.className = "row"; th.textContent = g.rows[r]; tr.appendChild(th);
    g.cols.forEach((_, c) => {
      const td = tr.insertCell(), v = g.values[r][c];
      td.className = "cell"; td.dataset.row = r; td.dataset.col = c;
      td.style.background = v === null ? "#b0b0b0" : ramp(VIRIDIS, (v - lo) / (hi - lo));
    });
  }
  const tr = grid.insertRow(); tr.appendChild(document.createElement("th"));
  g.cols.forEach(col => { const th = document.createElement("th"); th.textContent = col; tr.appendChild(th); });
  document.getElementById("lo").textContent = lo.toPrecision(3);
  document.getElementById("hi").textContent = hi.toPrecision(3);
  document.getElementById("bar").style.background = "linear-gradient(to right," + VIRIDIS.join(",") + ")";
  document.getElementById("unit").textContent = g.label;
}
function showTip(ev) {
  const td = ev.target.closest("td.cell"), tip = document.getElementById("tip");
  if (!td) { tip.style.display = "none"; return; }
  const g = D.grids[name], v = g.values[+td.dataset.row][+td.dataset.col];
  tip.textContent = g.rowName + " " + g.rows[+td.dataset.row] + ", " + g.colName + " " + g.cols[+td.dataset.col] +
    "\\n" + g.label + ": " + (v === null ? "n/a" : v.toPrecision(4));
  tip.style.display = "block";
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
  tip.style.top = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 4) + "px";
}
Object.keys(D.grids).forEach(k => {
  const label = document.createElement("label"), input = document.createElement("input");
  input.type = "radio"; input.name = "grid"; input.checked = k === name;
  input.addEventListener("change", () => { name = k; render(); });
  label.append(input, " " + k); document.getElementById("controls").appendChild(label);
});
document.getElementById("grid").addEventListener("mousemove", showTip);
document.getElementById("grid").addEventListener("mouseleave", () => { document.getElementById("tip").style.display = "none"; });
render();
""",
}
"""A page of named grids, one shown at a time (the note is the caller's)."""
