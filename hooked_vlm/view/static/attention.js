// The attention view: pick a tower's self- or cross-attention, a layer and a head (or the mean over heads); hover
// a query token (click pins it) and see its pattern over the image's patches and over the other tokens.
"use strict";
(() => {
  const { data, el } = HV;
  const root = document.getElementById("hv-root");
  const sets = data.sets.map((s) => ({
    ...s, values: HV.decode(s.values), scales: s.scales ? HV.decode(s.scales) : null,
    qIndex: new Map(s.queries.map((q, i) => [q, i])),
    segment: s.k_axis.labels.map((_, k) => s.k_axis.image[k] === 0 && s.k_axis.rows[k] >= 0),
  }));
  const state = window.hv.state;
  Object.assign(state, { set: data.default_set || 0, layer: 0, head: "mean", query: null, pinned: false, row: null, grid: null });

  // the pattern of head h (or the mean) of layer index li, query index qi: Float32Array over the keys
  function row(set, li, head, qi) {
    const [L, H, Q, S] = set.values.shape, out = new Float32Array(S);
    const heads = head === "mean" ? [...Array(H).keys()] : [Number(head)];
    for (const h of heads) {
      const base = ((li * H + h) * Q + qi) * S;
      if (set.scales) {
        const sb = ((li * H + h) * Q + qi) * 2, s0 = set.scales.get(sb) / 255, s1 = set.scales.get(sb + 1) / 255;
        for (let k = 0; k < S; k++) out[k] += set.values.raw[base + k] * (set.segment[k] ? s1 : s0);
      } else for (let k = 0; k < S; k++) out[k] += set.values.get(base + k);
    }
    if (heads.length > 1) for (let k = 0; k < S; k++) out[k] /= heads.length;
    return out;
  }

  const controls = el("div", { class: "hv-controls" }, root);
  const setSel = HV.select(controls, "hv-set", "attention", sets.map((s, i) => [i, s.name]), (v) => { state.set = Number(v); rebuild(); });
  let layerSel = null, headSel = null;
  const layerWrap = el("span", {}, controls), headWrap = el("span", {}, controls);
  const info = el("span", { class: "hv-note" }, controls);
  const qBox = el("div", { class: "hv-box" }, root);
  el("h2", { text: "query tokens (hover to see one's attention; click to pin; dashed: not in this file)" }, qBox);
  const qStrip = el("div", { class: "hv-strip", id: "hv-queries" }, qBox);
  const panelHost = el("div", { id: "hv-panel" }, root);
  let panel = null;

  function rebuild() {
    const set = sets[state.set];
    layerWrap.textContent = ""; headWrap.textContent = "";
    layerSel = HV.select(layerWrap, "hv-layer", "layer", set.layers.map((l, i) => [i, String(l)]), (v) => { state.layer = Number(v); draw(); });
    headSel = HV.select(headWrap, "hv-head", "head", [["mean", "mean of heads"], ...[...Array(set.n_heads).keys()].map((h) => [h, String(h)])], (v) => { state.head = v; draw(); });
    state.layer = Math.min(state.layer, set.layers.length - 1); layerSel.value = String(state.layer); headSel.value = String(state.head);
    qStrip.textContent = "";
    const miniGrids = new Map();  // image index -> its cells: an image's tokens as queries, laid out as its patches
    set.q_axis.labels.forEach((label, q) => {
      const inFile = set.qIndex.has(q), img = set.q_axis.image[q], r = set.q_axis.rows[q], c = set.q_axis.cols[q];
      let t;
      if (img >= 0 && r >= 0 && data.grid) {
        if (!miniGrids.has(img)) {
          const mini = el("span", { class: "hv-mini", title: `image ${img}: its tokens as queries, by patch` }, qStrip);
          mini.style.gridTemplateColumns = `repeat(${data.grid[1]}, 9px)`;
          miniGrids.set(img, [...Array(data.grid[0] * data.grid[1]).keys()].map(() => el("span", { class: "hv-mq hv-off" }, mini)));
        }
        t = miniGrids.get(img)[r * data.grid[1] + c];
        t.className = "hv-mq " + (inFile ? "hv-q" : "hv-off");
        t.setAttribute("data-q", String(q));
        t.addEventListener("mousemove", (ev) => HV.showTip(ev, `${HV.shown(label)} (pos ${q})${inFile ? "" : ": not in this file"}`));
        t.addEventListener("mouseleave", HV.hideTip);
      } else {
        const cls = "hv-tok " + (inFile ? "hv-q" : "hv-off") + (r >= 0 ? " hv-img" : "");
        t = el("span", { class: cls, "data-q": String(q), text: HV.shown(label) }, qStrip);
      }
      if (!inFile) { t.title = "its attention is not in this file (pass queries= to include it)"; return; }
      t.addEventListener("mouseenter", () => { if (!state.pinned) pick(q); });
      t.addEventListener("click", () => { state.pinned = !(state.pinned && state.query === q); pick(q); });
    });
    panelHost.textContent = "";
    panel = HV.valuePanel(panelHost, set.k_axis, {
      gridTitle: "keys over the image", stripTitle: "keys: other tokens",
      onCell: (r, c, k, ev, kind) => {  // a click on a patch picks it as the query where it is one (vision towers)
        if (kind !== "click") return;
        const q = set.q_axis.labels.findIndex((_, i) => set.q_axis.image[i] === 0 && set.q_axis.rows[i] === r && set.q_axis.cols[i] === c);
        if (q >= 0 && set.qIndex.has(q)) { state.pinned = true; pick(q); }
      },
    });
    const last = [...set.qIndex.keys()].pop();
    pick(state.query !== null && set.qIndex.has(state.query) ? state.query : last);
  }

  function pick(q) { state.query = q; draw(); }

  function draw() {
    const set = sets[state.set], qi = set.qIndex.get(state.query);
    if (qi === undefined) return;
    const drawn = panel.show(row(set, state.layer, state.head, qi));
    Object.assign(state, { tower: set.tower, attention: set.attention, layerIndex: set.layers[state.layer], row: drawn.row, grid: drawn.grid });
    for (const t of qStrip.querySelectorAll("[data-q]")) t.classList.toggle("hv-sel", Number(t.dataset.q) === state.query);
    info.textContent = `${set.name}, layer ${set.layers[state.layer]}, ${state.head === "mean" ? "mean of heads" : "head " + state.head}, query ${state.query} ${HV.shown(set.q_axis.labels[state.query])}${state.pinned ? " (pinned)" : ""}`;
    state.draws = (state.draws || 0) + 1;
  }

  setSel.value = String(state.set);
  rebuild();
  window.hv.row = (set, layerIndex, head, query) => Array.from(row(sets[set], layerIndex, head, sets[set].qIndex.get(query)));
})();
