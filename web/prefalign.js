// PrefAlign ComfyUI frontend extension: the gallery picker and the live loss chart.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  acceptsTrainMessage, chartGeometry, clickMark, createMarkSender, fitText, gridLayout, imageUrl, keyAction, markBody, MAX_TILES,
  mergePoints, modelSource, moveCursor, nextMark, nodeQueueError, progressText, queueTransition, sanitizeBatch, smooth, summary,
  textLines, textRows,
} from "./prefalign_logic.js";
import { attachScoring, injectStyle } from "./prefalign_compare.js";

const PACK_PREFIX = "PrefAlign"; // every node of the pack: its result text shows on the node
const GALLERY = "PrefAlignGalleryPicker";
const TRAIN = "PrefAlignTrainLoRA";
const COLORS = { chosen: "#2e9e44", rejected: "#c8323c", none: "transparent" };

const STYLE = `
.prefalign-gallery { display:flex; flex-direction:column; gap:4px; font:12px sans-serif; color:var(--fg-color,#ddd); outline:none; overflow:auto; height:100%; box-sizing:border-box; }
.prefalign-gallery:focus { box-shadow: inset 0 0 0 1px #4a8fe7; }
.prefalign-gallery .pa-prompt { opacity:.85; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.prefalign-gallery .pa-grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(96px,1fr)); gap:4px; flex:1; min-height:0; align-content:start; }
.prefalign-gallery .pa-tile { position:relative; border:3px solid transparent; border-radius:4px; cursor:pointer; }
.prefalign-gallery .pa-tile.pa-cursor { outline:2px dashed #4a8fe7; outline-offset:1px; }
.prefalign-gallery .pa-tile img { width:100%; display:block; border-radius:2px; }
.prefalign-gallery .pa-badge { position:absolute; top:2px; left:2px; padding:0 4px; border-radius:3px; font-weight:bold; color:#fff; }
.prefalign-gallery .pa-status { opacity:.85; }
.prefalign-gallery .pa-error { color:#f66; }
.prefalign-chart { width:100%; height:100%; display:flex; flex-direction:column; font:11px sans-serif; color:var(--fg-color,#ddd); }
.prefalign-chart .pa-fit { white-space:pre-wrap; overflow-wrap:anywhere; opacity:.85; margin-bottom:3px; max-height:60px; overflow:auto; }
.prefalign-chart .pa-fit.pa-refused { color:#ff8a8a; opacity:1; }
.prefalign-chart canvas { flex:1; width:100%; min-height:80px; background:rgba(0,0,0,.25); border-radius:4px; }
.prefalign-text.pa-stale { opacity:.45; }
.prefalign-text { font:12px sans-serif; color:var(--fg-color,#ddd); white-space:pre-wrap; overflow-wrap:anywhere; overflow:auto; height:100%; box-sizing:border-box; padding:4px 6px; background:rgba(0,0,0,.2); border-radius:4px; user-select:text; }
.prefalign-preview { position:fixed; inset:0; z-index:10000; display:flex; flex-direction:column; align-items:center; justify-content:center; gap:6px; background:rgba(0,0,0,.8); font:13px sans-serif; color:#eee; cursor:zoom-out; }
.prefalign-preview img { height:86vh; width:auto; max-width:92vw; object-fit:contain; box-shadow:0 0 0 4px var(--pa-mark,transparent); }
`;

/** Wrap `obj[name]` (a frontend hook): the original runs first, then `fn` with the same `this` and arguments;
 * the original's result is returned. */
function after(obj, name, fn) {
  const original = obj[name];
  obj[name] = function (...args) {
    const r = original ? original.apply(this, args) : undefined;
    fn.apply(this, args);
    return r;
  };
}

/** The URL of image `index` of a gallery batch, under the frontend's API base when it has one. */
const imageSrc = (batch, index) => (api.apiURL ? api.apiURL(imageUrl(batch, index)) : imageUrl(batch, index));

/** The nodes of the open graph (`_nodes` in older frontends). */
const graphNodes = () => (app.graph ? app.graph._nodes || app.graph.nodes || [] : []);

async function jsonFetch(path, options) {
  const res = await api.fetchApi(path, options);
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  if (!res.ok) throw new Error((body && body.error) || `HTTP ${res.status}`);
  return body;
}

// ---------------------------------------------------------------- gallery picker
class Gallery {
  constructor(node) {
    this.node = node;
    this.batch = null;
    this.marks = [];
    this.cursor = 0;
    this.saved = true;
    this.el = document.createElement("div");
    this.el.className = "prefalign-gallery";
    this.el.tabIndex = 0;
    this.el.innerHTML = `<div class="pa-prompt"></div><div class="pa-grid"></div><div class="pa-status">Run the graph to show a batch here. Click = chosen, right-click/shift-click = rejected; keys C / R / X, arrows move; V, space or Ctrl+hover = full size.</div>`;
    this.promptEl = this.el.querySelector(".pa-prompt");
    this.grid = this.el.querySelector(".pa-grid");
    this.status = this.el.querySelector(".pa-status");
    this.hover = null;
    this.preview = null;
    // tiles grow with the node: as many columns as make the images largest in the space the node gives
    new ResizeObserver(() => this.layout()).observe(this.el);
    this.sender = createMarkSender(
      (body) => jsonFetch("/prefalign/mark", { method: "POST", headers: { "Content-Type": "application/json" }, body }),
      (state, pending, err) => this.onServer(state, pending, err),
    );
    this.el.addEventListener("keydown", (e) => this.onKey(e));
    this.el.addEventListener("contextmenu", (e) => e.preventDefault());
    this.el.addEventListener("pointerdown", (e) => e.stopPropagation());
  }

  /** Show a batch; `restore`: it came from the saved workflow, so its size comes from the server, not the graph. */
  async show(described, restore = false) {
    const batch = sanitizeBatch(described);
    if (!batch) {
      this.status.textContent = "This workflow names no valid gallery batch; run the graph to make one.";
      return;
    }
    let state = null;
    try {
      state = await jsonFetch(`/prefalign/batch?${new URLSearchParams({ store: batch.store, batch: batch.batch })}`);
    } catch (err) {
      if (restore) {
        this.status.textContent = `This batch is no longer in store "${batch.store}".`;
        return;
      }
    }
    if (state && Array.isArray(state.marks)) batch.count = Math.min(state.marks.length, MAX_TILES);
    this.batch = batch;
    this.marks = state && Array.isArray(state.marks) ? state.marks.slice(0, batch.count) : Array(batch.count).fill("none");
    this.cursor = 0;
    this.closePreview();
    this.promptEl.textContent = batch.prompt || "(no prompt)";
    this.promptEl.title = batch.prompt || "";
    this.grid.replaceChildren();
    this.tiles = [];
    for (let i = 0; i < batch.count; i++) {
      const tile = document.createElement("div");
      tile.className = "pa-tile";
      tile.dataset.index = String(i);
      const img = document.createElement("img");
      img.src = imageSrc(batch, i);
      img.draggable = false;
      const badge = document.createElement("span");
      badge.className = "pa-badge";
      tile.append(img, badge);
      tile.addEventListener("mousedown", (e) => {
        e.preventDefault(); e.stopPropagation();
        this.cursor = i;
        this.el.focus();
        this.mark(i, clickMark(e));
      });
      tile.addEventListener("mouseenter", (e) => { this.hover = i; if (e.ctrlKey || e.metaKey) this.openPreview(i); });
      tile.addEventListener("mousemove", (e) => { if ((e.ctrlKey || e.metaKey) && this.preview === null) this.openPreview(i); });
      tile.addEventListener("mouseleave", () => { this.hover = null; if (this.previewByHover) this.closePreview(); });
      this.grid.appendChild(tile);
      this.tiles.push(tile);
    }
    this.layout();
    this.render(state);
  }

  layout() {
    const n = this.tiles ? this.tiles.length : 0;
    if (!n) return;
    const width = this.grid.clientWidth;
    // every row but the grid (prompt, status, the scoring bar of prefalign_compare.js) and the 4 px gaps
    const others = [...this.el.children].filter((c) => c !== this.grid && !c.hidden);
    const height = this.el.clientHeight - others.reduce((h, c) => h + c.offsetHeight + 4, 0);
    const { columns, side } = gridLayout(n, width, height, 4);
    // 6 px: the tile's 3 px border on each side; never below the old fixed size
    const cell = Math.max(side - 6, 90);
    this.grid.style.gridTemplateColumns = side > 0 ? `repeat(${columns}, ${cell + 6}px)` : "";
  }

  /** Full-size view of one image, over the page; closes on click, Escape, V or releasing Ctrl. */
  openPreview(index, byHover = true) {
    if (!this.batch || index === null || index >= this.batch.count) return;
    this.closePreview();
    const overlay = document.createElement("div");
    overlay.className = "prefalign-preview";
    const img = document.createElement("img");
    img.src = this.tiles[index].querySelector("img").src;
    img.style.setProperty("--pa-mark", COLORS[this.marks[index]]);
    const caption = document.createElement("div");
    caption.textContent = `${index + 1} / ${this.batch.count} · ${this.marks[index]} · ${this.batch.prompt || ""}`;
    overlay.append(img, caption);
    // opened by Ctrl+hover: the pointer stays on the tile underneath (leaving it closes the view)
    if (byHover) overlay.style.pointerEvents = "none";
    overlay.addEventListener("mousedown", (e) => { e.preventDefault(); e.stopPropagation(); this.closePreview(); });
    document.body.appendChild(overlay);
    this.preview = { overlay, index };
    this.previewByHover = byHover;
  }

  closePreview() {
    if (this.preview) this.preview.overlay.remove();
    this.preview = null;
    this.previewByHover = false;
  }

  mark(index, wanted) {
    if (!this.batch) return;
    const mark = nextMark(this.marks[index], wanted);
    this.marks[index] = mark;
    this.saved = false;
    this.render();
    this.sender.send(markBody(this.batch, index, mark));
  }

  onKey(e) {
    const action = keyAction(e.key);
    if (!action || !this.batch) return;
    e.preventDefault();
    e.stopPropagation();
    if (action.type === "preview") {
      if (this.preview) this.closePreview();
      else this.openPreview(this.hover !== null ? this.hover : this.cursor, false);
      return;
    }
    if (action.type === "close") { this.closePreview(); return; }
    if (action.type === "move") this.cursor = moveCursor(this.cursor, action.delta, this.batch.count);
    else this.mark(this.cursor, action.mark === "none" ? this.marks[this.cursor] : action.mark);
    this.render();
  }

  onServer(state, pending, err) {
    if (state && this.batch && state.batch === this.batch.batch && pending === 0) {
      this.marks = state.marks;
      this.saved = true;
    }
    this.render(state, err, pending);
  }

  render(state = null, err = null, pending = 0) {
    (this.tiles || []).forEach((tile, i) => {
      const m = this.marks[i];
      tile.style.borderColor = COLORS[m];
      tile.classList.toggle("pa-cursor", i === this.cursor);
      const badge = tile.querySelector(".pa-badge");
      badge.textContent = m === "none" ? "" : m === "chosen" ? "✓ chosen" : "✗ rejected";
      badge.style.background = COLORS[m];
    });
    if (!this.batch) return;
    const s = summary(this.marks);
    const total = state && state.total_pairs !== undefined ? ` · store "${this.batch.store}" holds ${state.total_pairs}` : "";
    const saving = pending > 0 || !this.saved ? " · saving…" : " · saved";
    this.status.textContent = `${s.chosen} chosen, ${s.rejected} rejected → ${s.pairs} pairs${total}${saving}`;
    this.status.classList.toggle("pa-error", !!err);
    if (err) this.status.textContent += ` · not saved yet (${err.message}), retrying`;
  }
}

function setupGallery(node) {
  injectStyle("prefalign-style", STYLE);
  const gallery = new Gallery(node);
  attachScoring(gallery, { fetchJson: jsonFetch, imageSrc });
  node.prefalignGallery = gallery;
  node.addDOMWidget("prefalign_gallery", "prefalign_gallery", gallery.el, { serialize: false, hideOnZoom: false, getMinHeight: () => 220 });
  node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], 420)]);
  const saved = node.properties && node.properties.prefalign_batch;
  if (saved) gallery.show(saved, true);
}

// Ctrl+hover previews last while Ctrl is held
window.addEventListener("keyup", (e) => {
  if (e.key !== "Control" && e.key !== "Meta") return;
  for (const node of graphNodes()) {
    if (node.prefalignGallery && node.prefalignGallery.previewByHover) node.prefalignGallery.closePreview();
  }
});

// ---------------------------------------------------------------- result text (every node of the pack)
function showText(node, message) {
  const lines = textLines(message);
  if (!lines.length) return;
  if (!node.prefalignText) {
    injectStyle("prefalign-style", STYLE);
    const el = document.createElement("div");
    el.className = "prefalign-text";
    node.prefalignText = el;
    // tall enough for every row at the node's width, up to a scroll box
    const wanted = () => Math.min(14 + 15 * textRows(node.prefalignTextLines || [], node.size[0] - 32), 320);
    const widget = node.addDOMWidget("prefalign_text", "prefalign_text", el, { serialize: false, getMinHeight: wanted });
    // queued again: dimmed until this run's result replaces it (a failed run leaves it dimmed, marked as earlier)
    widget.beforeQueued = () => { el.classList.add("pa-stale"); el.title = "from an earlier run"; };
  }
  node.prefalignText.classList.remove("pa-stale");
  node.prefalignText.title = "";
  node.prefalignText.textContent = lines.join("\n");
  node.prefalignTextLines = lines;
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  node.setDirtyCanvas(true, true);
}

// ---------------------------------------------------------------- loss chart
class LossChart {
  constructor(node) {
    this.node = node;
    this.state = { step: 0, total: 0, points: [], status: "" };
    this.el = document.createElement("div");
    this.el.className = "prefalign-chart";
    this.fit = document.createElement("div"); // which methods train the connected model (see refreshFit)
    this.fit.className = "pa-fit";
    this.label = document.createElement("div");
    this.label.textContent = "loss: waiting for training";
    this.canvas = document.createElement("canvas");
    this.el.append(this.label, this.fit, this.canvas); // the label first: `.prefalign-chart div` is the progress line
  }

  showFit({ text, refused }, method) {
    this.fit.textContent = refused ? `${text}\n${method} does not: ${refused}` : text;
    this.fit.classList.toggle("pa-refused", Boolean(refused));
    this.fit.title = this.fit.textContent;
  }

  update(detail) {
    if (detail.prompt_id && this.state.prompt_id && detail.prompt_id !== this.state.prompt_id && detail.status === "running" && detail.step === 0) {
      this.state = { step: 0, total: 0, points: [], status: "" };
    }
    if (detail.step === 0 && detail.status === "running") this.state.points = [];
    this.state = { ...this.state, ...detail, points: mergePoints(this.state.points, detail.points || detail.loss || []) };
    this.draw();
  }

  /** Run pressed, refused, or ended before this node: see queueTransition. */
  transition(event, info) {
    this.state = queueTransition(this.state, event, info);
    this.draw();
  }

  draw() {
    this.label.textContent = progressText(this.state) || "loss";
    const c = this.canvas;
    const w = (c.width = c.clientWidth || 300), h = (c.height = c.clientHeight || 120);
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    const pts = this.state.points;
    if (!pts.length) return;
    const g = chartGeometry(pts, w, h, 18, this.state.total);
    ctx.strokeStyle = "rgba(120,160,255,.35)";
    ctx.beginPath();
    g.lines.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
    const sm = chartGeometry(smooth(pts), w, h, 18, this.state.total);
    const yScale = (v) => 18 + (1 - (v - g.min) / (g.max - g.min)) * (h - 36);
    ctx.strokeStyle = "#6fa0ff";
    ctx.lineWidth = 2;
    ctx.beginPath();
    smooth(pts).forEach(([, v], i) => { const x = sm.lines[i][0]; const y = yScale(v); i ? ctx.lineTo(x, y) : ctx.moveTo(x, y); });
    ctx.stroke();
    ctx.fillStyle = "#aaa";
    ctx.fillText(g.max.toPrecision(4), 2, 12);
    ctx.fillText(g.min.toPrecision(4), 2, h - 4);
  }
}

// ---------------------------------------------------------------- the connected model's methods
/** The node feeding `node`'s input `inputName`, or null (links are a Map in newer frontends, an object before). */
function upstreamOf(node, inputName) {
  const graph = node.graph || app.graph;
  const input = (node.inputs || []).find((i) => i.name === inputName);
  if (!graph || !input || input.link == null) return null;
  const links = graph.links;
  const link = links && (typeof links.get === "function" ? links.get(input.link) : links[input.link]);
  return link ? graph.getNodeById(link.origin_id) : null;
}

const probes = new Map(); // JSON of {folder, name, sampling} -> promise of the server's answer
function probeOf(source) {
  const key = JSON.stringify(source);
  if (!probes.has(key)) {
    probes.set(key, jsonFetch(`/prefalign/model_methods?${new URLSearchParams(source)}`)
      .catch((e) => ({ label: source.name, prediction_type: null, error: e.message })));
  }
  return probes.get(key);
}

/** Show which methods train the model the graph connects (read from its loader's file; no run needed). */
async function refreshFit(node, method) {
  const source = modelSource(node, upstreamOf);
  const key = `${JSON.stringify(source)}|${method.value}`;
  if (key === node.prefalignFitKey) return;
  node.prefalignFitKey = key;
  const fit = source ? fitText(await probeOf(source), method.value) : { text: "", refused: "" };
  if (node.prefalignFitKey === key) node.prefalignChart.showFit(fit, method.value); // unless it changed meanwhile
}

let methodTable = null;
async function methods() {
  if (!methodTable) methodTable = await jsonFetch("/prefalign/methods");
  return methodTable;
}

function setupTrain(node) {
  injectStyle("prefalign-style", STYLE);
  const chart = new LossChart(node);
  node.prefalignChart = chart;
  const widget = node.addDOMWidget("prefalign_loss", "prefalign_loss", chart.el, { serialize: false, getMinHeight: () => 170 });
  widget.beforeQueued = () => chart.transition("queued"); // the previous run's "done" must not stand for this one
  node.setSize([Math.max(node.size[0], 360), node.size[1] + 150]);
  const method = node.widgets && node.widgets.find((w) => w.name === "method");
  const args = node.widgets && node.widgets.find((w) => w.name === "method_args");
  if (method && args) {
    const orig = method.callback;
    method.callback = async function (value, ...rest) {
      const r = orig ? orig.call(this, value, ...rest) : undefined;
      try {
        const table = await methods();
        if (table[value]) { args.value = table[value].text; node.setDirtyCanvas(true, true); }
      } catch (err) { console.warn("PrefAlign: could not read method defaults", err); }
      return r;
    };
  }
  if (method) {  // the graph above the node changes without telling it: look every second (a fetch only on change)
    const timer = setInterval(() => refreshFit(node, method).catch(() => {}), 1000);
    after(node, "onRemoved", () => clearInterval(timer));
  }
  // a reloaded page recovers the curve of a run that is still going (or just finished)
  jsonFetch("/prefalign/train/status").then((s) => {
    const run = s && s.runs && s.runs[String(node.id)];
    if (run) chart.update({ ...run, points: run.loss });
  }).catch(() => {});
}

function charts() {
  return graphNodes().filter((n) => n.prefalignChart);
}

app.registerExtension({
  name: "prefalign.ui",
  async setup() {
    // register before any message arrives: the frontend drops custom events nobody listens to
    api.addEventListener("prefalign.train", (event) => {
      for (const node of charts()) if (acceptsTrainMessage(event.detail, node.id)) node.prefalignChart.update(event.detail);
    });
    // a graph the server refused (e.g. learning_rate at queue time) or a run that ended before the Train node
    api.addEventListener("promptQueued", () => {
      const errors = app.lastNodeErrors;
      if (!errors || !Object.keys(errors).length) return;
      for (const node of charts()) node.prefalignChart.transition("refused", nodeQueueError(errors, node.id));
    });
    api.addEventListener("execution_error", (e) => {
      for (const node of charts()) node.prefalignChart.transition("failed", e.detail && e.detail.node_type);
    });
    api.addEventListener("execution_interrupted", () => charts().forEach((n) => n.prefalignChart.transition("interrupted")));
    api.addEventListener("execution_success", () => charts().forEach((n) => n.prefalignChart.transition("finished")));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const proto = nodeType.prototype;
    if (nodeData.name.startsWith(PACK_PREFIX)) {
      after(proto, "onExecuted", function (message) { showText(this, message); });
    }
    if (nodeData.name === GALLERY) {
      after(proto, "onNodeCreated", function () { setupGallery(this); });
      after(proto, "onExecuted", function (message) {
        const batch = sanitizeBatch(message && message.prefalign_batch && message.prefalign_batch[0]);
        if (batch) {
          this.properties = this.properties || {};
          this.properties.prefalign_batch = batch; // saved with the workflow: reopening restores the marks
          this.prefalignGallery && this.prefalignGallery.show(batch);
        }
      });
      after(proto, "onConfigure", function () {
        const saved = sanitizeBatch(this.properties && this.properties.prefalign_batch);
        if (saved && this.prefalignGallery && (!this.prefalignGallery.batch || this.prefalignGallery.batch.batch !== saved.batch)) {
          this.prefalignGallery.show(saved, true);
        }
      });
    }
    if (nodeData.name === TRAIN) {
      after(proto, "onNodeCreated", function () { setupTrain(this); });
      after(proto, "onExecuted", function (message) {
        const info = message && message.prefalign_train && message.prefalign_train[0];
        if (info && this.prefalignChart) this.prefalignChart.update({ status: info.stopped ? "stopped" : "done", lora: info.lora, step: info.steps });
      });
    }
  },
});
