// The logit-lens view: per layer, each image patch shows the top-1 token the lens decodes at that image token
// (colour: its probability, or an asked token's), the top-k on hover; the text positions below.
"use strict";
(() => {
  const { data, el } = HV;
  const root = document.getElementById("hv-root");
  const top = HV.decode(data.top), probs = HV.decode(data.probs), [L, P, K] = top.shape;
  const topIds = HV.decode(data.top_ids);
  const asked = data.token_probs ? HV.decode(data.token_probs) : null;
  const axis = data.axis, state = window.hv.state;
  Object.assign(state, { layer: L - 1, colour: "top1", top1: null, hover: null });
  const slot = new Map(data.positions.map((p, i) => [p, i]));  // sequence position -> index in the lens
  const topk = (l, i) => [...Array(K).keys()].map((r) => [data.vocab[top.get((l * P + i) * K + r)], probs.get((l * P + i) * K + r), topIds.get((l * P + i) * K + r)]);
  const shade = (l, i) => state.colour === "top1" ? probs.get((l * P + i) * K)
    : asked.get((l * P + i) * asked.shape[2] + Number(state.colour));

  const controls = el("div", { class: "hv-controls" }, root);
  const layerSel = HV.select(controls, "hv-layer", "layer", data.layer_labels.map((x, i) => [i, x]), (v) => setLayer(Number(v)));
  const slider = el("input", { type: "range", id: "hv-layer-range", min: "0", max: String(L - 1), value: String(L - 1) }, controls);
  slider.addEventListener("input", () => setLayer(Number(slider.value)));
  const colours = [["top1", "top-1 probability"], ...(data.token_names || []).map((n, j) => [j, `P(${n})`])];
  HV.select(controls, "hv-colour", "colour", colours, (v) => { state.colour = v; draw(); });
  el("span", { class: "hv-note", text: `${data.tower}, hook ${data.hook}, top ${K}` }, controls);

  const row = el("div", { class: "hv-row" }, root);
  const cellPos = new Map();  // "r,c" -> sequence position (image 0's patches in the lens)
  axis.labels.forEach((_, p) => { if (axis.image[p] === 0 && axis.rows[p] >= 0 && slot.has(p)) cellPos.set(`${axis.rows[p]},${axis.cols[p]}`, p); });
  let g = null;
  if (cellPos.size && data.grid) {
    const box = el("div", { class: "hv-box" }, row);
    el("h2", { text: "image tokens: top-1 token per patch (hover for the top-k)" }, box);
    g = HV.imageGrid(box, data.grid, data.image, Math.max(336, 24 * data.grid[1]), (r, c, ev, kind) => {
      const p = cellPos.get(`${r},${c}`);
      if (p !== undefined && kind === "hover") hover(p, ev);
    });
  }
  const textBox = el("div", { class: "hv-box" }, row);
  el("h2", { text: cellPos.size ? "other positions: the token, and below it the top-1 the lens decodes" : "positions: the token, and below it the top-1 the lens decodes" }, textBox);
  const strip = el("div", { class: "hv-strip", id: "hv-text" }, textBox);
  const toks = [];
  axis.labels.forEach((label, p) => {
    if (cellPos.size && axis.image[p] === 0 && axis.rows[p] >= 0) return;
    const t = el("span", { class: "hv-tok" + (slot.has(p) ? "" : " hv-off"), "data-p": String(p) }, strip);
    el("span", { text: HV.shown(label) }, t);
    const sub = el("span", { class: "hv-sub" }, t);
    if (slot.has(p)) { t.addEventListener("mousemove", (ev) => hover(p, ev)); t.addEventListener("mouseleave", HV.hideTip); }
    toks.push([p, t, sub]);
  });
  const legend = el("div", { class: "hv-legend" }, root);

  function hover(p, ev) {
    const k = topk(state.layer, slot.get(p));
    state.hover = { pos: p, topk: k.map(([s, pr, id]) => [s, pr, id]) };
    HV.showTip(ev, `${HV.shown(axis.labels[p])} (pos ${p}), layer ${data.layer_labels[state.layer]}:\n` + k.map(([s, pr]) => `${HV.fmt(pr)}  ${HV.shown(s)}`).join("\n"));
  }
  function setLayer(l) { state.layer = l; layerSel.value = String(l); slider.value = String(l); draw(); }
  function draw() {
    const l = state.layer, top1 = {};
    for (const p of data.positions) top1[p] = data.vocab[top.get((l * P + slot.get(p)) * K)];
    if (g) g.cells.forEach((cell, i) => {
      const p = cellPos.get(`${Math.floor(i / data.grid[1])},${i % data.grid[1]}`);
      if (p === undefined) { cell.textContent = ""; cell.style.background = "transparent"; return; }
      const v = shade(l, slot.get(p));
      cell.textContent = HV.shown(top1[p]);
      cell.style.background = HV.seq(v).replace("rgb", "rgba").replace(")", ",0.78)");
      cell.style.color = v < 0.55 ? "#fff" : "#000";
    });
    for (const [p, t, sub] of toks) {
      if (!slot.has(p)) continue;
      const v = shade(l, slot.get(p));
      sub.textContent = HV.shown(top1[p]);
      t.style.background = HV.seq(v); t.style.color = v < 0.55 ? "#fff" : "#000";
    }
    legend.textContent = `colour: ${state.colour === "top1" ? "the top-1 token's probability" : "P(" + data.token_names[Number(state.colour)] + ")"}, dark = 0 to yellow = 1`;
    state.top1 = top1;
  }
  draw();
})();
