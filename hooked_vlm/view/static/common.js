// hooked_vlm views: what every page shares. Reads the payload, decodes its arrays, draws colour maps, the image
// grid and token strips. Everything the page draws is also put on `window.hv.state`, so that a test (or a user in
// the console) can read the numbers behind the colours.
"use strict";
const HV = (() => {
  const data = JSON.parse(document.getElementById("hv-data").textContent);

  // float16 -> float32 through a 65,536-entry table: one lookup per value
  const HALF = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    HALF[h] = e === 0 ? s * f * 2 ** -24 : e === 31 ? (f ? NaN : s * Infinity) : s * (1 + f / 1024) * 2 ** (e - 15);
  }

  function bytes(b64) {
    const bin = atob(b64), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // An encoded array -> {dtype, shape, raw (typed array as stored), get(flat index) -> number}
  function decode(entry) {
    const b = bytes(entry.data);
    const raw = entry.dtype === "float16" ? new Uint16Array(b.buffer)
      : entry.dtype === "float32" ? new Float32Array(b.buffer)
      : entry.dtype === "int32" ? new Int32Array(b.buffer) : b;
    const get = entry.dtype === "float16" ? (i) => HALF[raw[i]] : (i) => raw[i];
    return { dtype: entry.dtype, shape: entry.shape, raw, get };
  }

  // colour maps: t in [0, 1] -> "rgb(...)"; sequential (viridis-like) and diverging (blue-white-red)
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const RDBU = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
  function ramp(stops, t) {
    t = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i, a = stops[i], b = stops[i + 1];
    return `rgb(${Math.round(a[0] + f * (b[0] - a[0]))},${Math.round(a[1] + f * (b[1] - a[1]))},${Math.round(a[2] + f * (b[2] - a[2]))})`;
  }
  const seq = (t) => ramp(VIRIDIS, t), div = (t) => ramp(RDBU, t);

  const tip = document.getElementById("hv-tip");
  function showTip(ev, text) {
    tip.textContent = text; tip.hidden = false;
    tip.style.left = Math.min(ev.clientX + 12, window.innerWidth - 300) + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  }
  function hideTip() { tip.hidden = true; }

  function el(tag, attrs = {}, parent = null) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") node.textContent = v; else if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    if (parent) parent.appendChild(node);
    return node;
  }
  function select(parent, id, label, options, onChange) {
    const wrap = el("label", { text: label }, parent);
    const s = el("select", { id }, wrap);
    for (const [value, text] of options) el("option", { value: String(value), text }, s);
    s.addEventListener("change", () => onChange(s.value));
    return s;
  }
  const fmt = (v) => (v === null || v === undefined || Number.isNaN(v)) ? "NaN"
    : Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(4) : v.toExponential(2);
  const shown = (label) => label.length ? label.replace(/\n/g, "\\n") : "\u2205";

  // The image with a rows x cols grid of cells over it. `onCell(r, c, ev, kind)` for hover / click.
  function imageGrid(parent, grid, image, size, onCell) {
    const [rows, cols] = grid;
    const box = el("div", { class: "hv-grid" }, parent);
    const w = size, h = Math.round(size * (image ? image.height / image.width : rows / cols));
    if (image) el("img", { src: image.uri, width: w, height: h, alt: "the image as the model sees it" }, box);
    else { box.style.width = w + "px"; box.style.height = h + "px"; box.style.background = "#ddd"; }
    const layer = el("div", { class: "hv-cells" }, box);
    layer.style.gridTemplateColumns = `repeat(${cols}, 1fr)`;
    layer.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
    const cells = [];
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
      const cell = el("div", { class: "hv-cell", "data-rc": `${r},${c}` }, layer);
      cell.addEventListener("mousemove", (ev) => onCell(r, c, ev, "hover"));
      cell.addEventListener("mouseleave", hideTip);
      cell.addEventListener("click", (ev) => onCell(r, c, ev, "click"));
      cells.push(cell);
    }
    return { box, cells };
  }

  // What one query reads: its row of values over a key axis, drawn on the image grid (patch keys of image 0) and
  // on a strip of the other keys. `diverging`: signed values around 0 (sweep rows), else non-negative (attention).
  function valuePanel(parent, axis, opts = {}) {
    const grid = data.grid, n = axis.labels.length, isPatch = [];
    const cellOf = new Map();  // "r,c" -> key position
    for (let k = 0; k < n; k++) {
      isPatch.push(axis.image[k] === 0 && axis.rows[k] >= 0);
      if (isPatch[k]) cellOf.set(`${axis.rows[k]},${axis.cols[k]}`, k);
    }
    const hasGrid = cellOf.size > 0 && grid;
    const root = el("div", { class: "hv-row" }, parent);
    let values = new Float32Array(n), drawnGrid = null;
    const box = el("div", { class: "hv-box" }, root);
    const gridTitle = hasGrid ? el("h2", { text: opts.gridTitle || "over the image" }, box) : null;
    const g = hasGrid ? imageGrid(box, grid, data.image, opts.size || 336, (r, c, ev, kind) => {
      const k = cellOf.get(`${r},${c}`);
      if (kind === "hover") showTip(ev, k === undefined ? `patch ${r},${c}: no token` : `${shown(axis.labels[k])} (pos ${k}, patch ${r},${c}): ${fmt(values[k])}`);
      if (opts.onCell) opts.onCell(r, c, k, ev, kind);
    }) : null;
    const legend = el("div", { class: "hv-legend" }, box);
    const stripBox = el("div", { class: "hv-box" }, root);
    el("h2", { text: opts.stripTitle || (hasGrid ? "other tokens" : "tokens") }, stripBox);
    const strip = el("div", { class: "hv-strip" }, stripBox);
    const toks = [];
    for (let k = 0; k < n; k++) {
      if (hasGrid && isPatch[k]) continue;
      const t = el("span", { class: "hv-tok", "data-k": String(k), text: shown(axis.labels[k]) }, strip);
      t.addEventListener("mousemove", (ev) => showTip(ev, `${shown(axis.labels[k])} (pos ${k}): ${fmt(values[k])}`));
      t.addEventListener("mouseleave", hideTip);
      toks.push([k, t]);
    }
    function colour(v, lo, hi) {
      if (!Number.isFinite(v)) return "transparent";
      return opts.diverging ? div(0.5 + 0.5 * v / (Math.max(Math.abs(lo), Math.abs(hi)) || 1)) : seq(hi > lo ? (v - lo) / (hi - lo) : 0);
    }
    function range(keys) {
      let lo = Infinity, hi = -Infinity;
      for (const k of keys) if (Number.isFinite(values[k])) { lo = Math.min(lo, values[k]); hi = Math.max(hi, values[k]); }
      if (!opts.diverging) lo = Math.min(lo, 0);
      return Number.isFinite(lo) ? [lo, hi] : [0, 1];
    }
    function show(row) {
      values = Float32Array.from(row);
      const patchKeys = [...cellOf.values()], textKeys = toks.map(([k]) => k);
      if (g) {
        const [lo, hi] = range(patchKeys);
        drawnGrid = new Array(grid[0] * grid[1]).fill(null);
        g.cells.forEach((cell, i) => {
          const k = cellOf.get(`${Math.floor(i / grid[1])},${i % grid[1]}`);
          const v = k === undefined ? NaN : values[k];
          drawnGrid[i] = k === undefined ? null : v;
          cell.style.background = colour(v, lo, hi);
          cell.style.opacity = opts.opacity ?? 0.62;
        });
        legend.textContent = `colour: ${opts.diverging ? "blue - 0 - red" : "dark = 0 to yellow = max"} over the patches; range ${fmt(lo)} .. ${fmt(hi)}`;
      }
      const [lo, hi] = range(textKeys);
      for (const [k, t] of toks) t.style.background = colour(values[k], lo, hi), t.style.color = colourText(values[k], lo, hi);
      return { row: Array.from(values, (v) => (Number.isFinite(v) ? v : null)), grid: drawnGrid };
    }
    function colourText(v, lo, hi) {
      if (!Number.isFinite(v)) return "#999";
      if (opts.diverging) return "#000";
      return hi > lo && (v - lo) / (hi - lo) < 0.55 ? "#fff" : "#000";
    }
    function mark(k) { for (const [kk, t] of toks) t.classList.toggle("hv-sel", kk === k); if (g) g.cells.forEach((c) => c.classList.remove("hv-sel")); if (g && isPatch[k]) g.cells[axis.rows[k] * grid[1] + axis.cols[k]].classList.add("hv-sel"); }
    return { root, show, mark, gridTitle, grid: g };
  }

  window.hv = { data, state: {}, decode, fmt };
  return { data, decode, seq, div, el, select, showTip, hideTip, fmt, shown, imageGrid, valuePanel };
})();
