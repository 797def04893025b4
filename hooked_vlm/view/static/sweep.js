// The sweep view: a [layers, heads] or [layers, positions] heatmap; hover a cell for its value, click it for that
// head's attention pattern (heads) or that layer's scores over the image grid and the text (positions).
"use strict";
(() => {
  const { data, el } = HV;
  const root = document.getElementById("hv-root");
  const scores = HV.decode(data.scores), [L, C] = scores.shape;
  const state = window.hv.state;
  Object.assign(state, { hover: null, selected: null, row: null, grid: null });
  const at = (l, c) => scores.get(l * C + c);

  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < L * C; i++) { const v = scores.get(i); if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }
  if (!Number.isFinite(lo)) { lo = -1; hi = 1; }
  const bound = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
  const colour = (v) => data.centered ? HV.div(0.5 + 0.5 * v / bound) : HV.seq(hi > lo ? (v - lo) / (hi - lo) : 0);

  const imageCol = (c) => data.axis ? data.axis.rows[c] >= 0 || data.axis.image[c] >= 0 : false;
  const colName = data.mode === "heads" ? "head" : "position";
  const box = el("div", { class: "hv-box" }, root);
  el("h2", { text: `[layers, ${data.mode}]: hover a cell for its value, click it for ${data.mode === "heads" ? "that head's attention pattern" : "that layer over the image and the text"}` }, box);
  const scroll = el("div", { class: "hv-scroll" }, box);
  const heat = el("div", { class: "hv-heat", id: "hv-heat" }, scroll);
  const cw = C > 80 ? 8 : C > 40 ? 12 : 22;
  heat.style.gridTemplateColumns = `44px repeat(${C}, ${cw}px)`;
  el("div", { class: "hv-lab", text: "layer" }, heat);
  const labelHeight = Math.min(96, 10 + 7 * Math.max(1, ...data.col_labels.map((x) => x.length))) + "px";  // the longest
  for (let c = 0; c < C; c++) {
    const lab = el("div", { class: "hv-lab hv-collab" + (imageCol(c) ? " hv-imgcol" : ""), text: HV.shown(data.col_labels[c]) }, heat);
    lab.title = data.col_labels[c];
    lab.style.height = labelHeight;
  }
  const cells = [];
  for (let l = 0; l < L; l++) {
    el("div", { class: "hv-lab", text: data.row_labels[l] }, heat);
    for (let c = 0; c < C; c++) {
      const v = at(l, c);
      const cell = el("div", { class: "hv-hc" + (Number.isFinite(v) ? "" : " hv-nan"), "data-cell": `${l},${c}` }, heat);
      if (Number.isFinite(v)) cell.style.background = colour(v);
      cell.addEventListener("mousemove", (ev) => {
        state.hover = { layer: l, col: c, value: Number.isFinite(v) ? v : null };
        HV.showTip(ev, `layer ${data.row_labels[l]}, ${colName} ${c} ${HV.shown(data.col_labels[c])}: ${HV.fmt(v)}`);
      });
      cell.addEventListener("mouseleave", HV.hideTip);
      cell.addEventListener("click", () => pick(l, c));
      cells.push(cell);
    }
  }
  const legend = el("div", { class: "hv-legend" }, box);
  legend.textContent = data.centered ? `blue = -${HV.fmt(bound)}, white = 0, red = +${HV.fmt(bound)}; hatched: NaN (no such hook in that layer)`
    : `dark = ${HV.fmt(lo)} to yellow = ${HV.fmt(hi)}; hatched: NaN`;

  const info = el("p", { class: "hv-note", id: "hv-info", text: "click a cell" }, root);
  const detail = el("div", { id: "hv-detail" }, root);
  const set = data.sets.length ? { ...data.sets[0], values: HV.decode(data.sets[0].values) } : null;
  let panel = null;
  if (data.mode === "heads" && set) panel = HV.valuePanel(detail, set.k_axis, { gridTitle: "the head's attention over the image", stripTitle: "over the other tokens" });
  else if (data.mode === "positions" && data.axis) panel = HV.valuePanel(detail, data.axis, { diverging: data.centered, gridTitle: "the layer's scores over the image", stripTitle: "over the text" });
  else el("p", { class: "hv-note", text: data.mode === "heads" ? "pass cache= (with the tower's attention patterns) to see a head's pattern here" : "pass model= and inputs= to see a layer's scores over the image" }, detail);

  function pick(l, c) {
    cells.forEach((cell) => cell.classList.remove("hv-sel"));
    cells[l * C + c].classList.add("hv-sel");
    const v = at(l, c);
    state.selected = { layer: l, col: c, value: Number.isFinite(v) ? v : null };
    let text = `layer ${data.row_labels[l]}, ${colName} ${c} ${HV.shown(data.col_labels[c])}: ${HV.fmt(v)}`;
    if (panel && data.mode === "heads") {
      const li = set.layers.indexOf(l);
      if (li < 0) { text += ` (layer ${l} has no ${set.attention} pattern)`; state.row = state.grid = null; }
      else {
        const [, H, , S] = set.values.shape, base = ((li * H + c) * 1 + 0) * S, row = new Float32Array(S);
        for (let k = 0; k < S; k++) row[k] = set.values.get(base + k);
        const drawn = panel.show(row);
        state.row = drawn.row; state.grid = drawn.grid;
        text += `; its attention from query ${data.query} ${HV.shown(set.q_axis.labels[data.query])}`;
      }
    } else if (panel) {
      const row = new Float32Array(C);
      for (let k = 0; k < C; k++) row[k] = at(l, k);
      const drawn = panel.show(row); panel.mark(c);
      state.row = drawn.row; state.grid = drawn.grid;
    }
    info.textContent = text;
  }
  // start on the strongest cell
  let best = 0, bestV = -Infinity;
  for (let i = 0; i < L * C; i++) { const v = Math.abs(scores.get(i)); if (v > bestV) { bestV = v; best = i; } }
  pick(Math.floor(best / C), best % C);
})();
