// PrefAlign web logic with no DOM and no ComfyUI imports: tested with `node --test tests/web/`.
// ComfyUI imports every .js file under WEB_DIRECTORY; this one only defines functions.

export const MARKS = ["none", "chosen", "rejected"];
export const MAX_TILES = 64; // images a gallery shows (one request each); a crafted workflow may claim thousands
export const MAX_TEXT_LINES = 40; // result text shown on a node
export const MAX_TEXT_CHARS = 4000;
const STORE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/; // the server's store-name rule
const BATCH_ID = /^[0-9a-f]{32}$/;

/** Keyboard shortcuts of the gallery picker -> action. */
export function keyAction(key) {
  switch (key) {
    case "c": case "C": case "1": case "Enter": return { type: "mark", mark: "chosen" };
    case "r": case "R": case "2": case "Backspace": return { type: "mark", mark: "rejected" };
    case "x": case "X": case "0": case "Delete": return { type: "mark", mark: "none" };
    case "ArrowRight": case "ArrowDown": case "l": return { type: "move", delta: 1 };
    case "ArrowLeft": case "ArrowUp": case "h": return { type: "move", delta: -1 };
    case "v": case "V": case " ": return { type: "preview" };
    case "Escape": return { type: "close" };
    default: return null;
  }
}

/** Marking an image with the mark it already has clears it (click twice to undo). */
export function nextMark(current, wanted) {
  if (!MARKS.includes(wanted)) throw new Error(`unknown mark ${wanted}`);
  return current === wanted ? "none" : wanted;
}

/** Mouse: left click = chosen, right click or shift/alt click = rejected. */
export function clickMark(event) {
  return event.button === 2 || event.shiftKey || event.altKey ? "rejected" : "chosen";
}

export function moveCursor(index, delta, count) {
  if (count <= 0) return 0;
  return (((index + delta) % count) + count) % count;
}

/** Every chosen x rejected pairing, as the server stores them. */
export function pairsFromMarks(marks) {
  const chosen = [], rejected = [];
  marks.forEach((m, i) => { if (m === "chosen") chosen.push(i); else if (m === "rejected") rejected.push(i); });
  const pairs = [];
  for (const c of chosen) for (const r of rejected) pairs.push([c, r]);
  return pairs;
}

export function summary(marks) {
  const chosen = marks.filter((m) => m === "chosen").length;
  const rejected = marks.filter((m) => m === "rejected").length;
  return { chosen, rejected, pairs: chosen * rejected };
}

export function markBody(batch, index, mark) {
  return JSON.stringify({ store: batch.store, batch: batch.batch, index, mark });
}

export function imageUrl(batch, index) {
  const q = new URLSearchParams({ store: batch.store, batch: batch.batch, index: String(index) });
  return `/prefalign/image?${q}`;
}

/**
 * Sends marks one at a time, in order, retrying failed sends (the server is the source of truth; the
 * page only shows a mark as saved once the server answered). `post(body)` returns a Promise of the
 * server's JSON state or throws. `onState(state, pending)` is called after each answer.
 */
export function createMarkSender(post, onState, { retryMs = 1000, maxRetries = 20, sleep } = {}) {
  const queue = [];
  let running = false;
  const wait = sleep || ((ms) => new Promise((r) => setTimeout(r, ms)));
  async function pump() {
    if (running) return;
    running = true;
    try {
      while (queue.length) {
        const item = queue[0];
        try {
          const state = await post(item.body);
          queue.shift();
          onState(state, queue.length, null);
        } catch (err) {
          item.tries += 1;
          if (item.tries > maxRetries) {
            queue.shift();
            onState(null, queue.length, err);
          } else {
            onState(null, queue.length, err);
            await wait(retryMs);
          }
        }
      }
    } finally {
      running = false;
    }
  }
  return {
    send(body) { queue.push({ body, tries: 0 }); return pump(); },
    get pending() { return queue.length; },
  };
}

/** Should a `prefalign.train` message update this node's chart? */
export function acceptsTrainMessage(detail, nodeId) {
  return !!detail && String(detail.node) === String(nodeId);
}

/**
 * Merge loss points [step, loss] by step, keep at most `max` by even thinning. Incoming points replace every known
 * point from their first step on: a resumed run retrains the steps logged after its checkpoint.
 */
export function mergePoints(points, incoming, max = 2000) {
  const fresh = (incoming || []).filter((p) => Array.isArray(p) && p.length >= 2 && Number.isFinite(p[0]) && Number.isFinite(p[1]));
  const from = fresh.length ? Math.min(...fresh.map((p) => p[0])) : Infinity;
  const byStep = new Map(points.filter((p) => p[0] < from).map((p) => [p[0], p]));
  for (const p of fresh) byStep.set(p[0], [p[0], p[1]]);
  let out = [...byStep.values()].sort((a, b) => a[0] - b[0]);
  if (out.length > max) {
    const stride = out.length / max;
    const thin = [];
    for (let i = 0; i < max - 1; i++) thin.push(out[Math.floor(i * stride)]);
    thin.push(out[out.length - 1]);
    out = thin;
  }
  return out;
}

/** Exponential moving average, for a readable curve over noisy per-step losses. */
export function smooth(points, weight = 0.9) {
  let ema = null;
  return points.map(([s, v]) => { ema = ema === null ? v : weight * ema + (1 - weight) * v; return [s, ema]; });
}

/** Canvas coordinates of a loss chart. */
export function chartGeometry(points, width, height, pad = 24, totalSteps = null) {
  if (!points.length) return { lines: [], min: null, max: null, x0: 0, x1: 0 };
  const steps = points.map((p) => p[0]);
  const values = points.map((p) => p[1]);
  let min = Math.min(...values), max = Math.max(...values);
  if (max - min < 1e-12) { min -= 0.5; max += 0.5; }
  const x0 = Math.min(...steps);
  const x1 = Math.max(totalSteps || 0, Math.max(...steps), x0 + 1);
  const w = width - 2 * pad, h = height - 2 * pad;
  const lines = points.map(([s, v]) => [pad + ((s - x0) / (x1 - x0)) * w, pad + (1 - (v - min) / (max - min)) * h]);
  return { lines, min, max, x0, x1 };
}

export function progressText(state) {
  if (!state) return "";
  const last = state.points && state.points.length ? state.points[state.points.length - 1][1] : null;
  const loss = last === null ? "" : `  loss ${last.toFixed(4)}`;
  const detail = state.status === "error" || state.status === "queued" ? state.message : state.lora;
  const tail = state.status && state.status !== "running" ? `  (${state.status}${detail ? ": " + detail : ""})` : "";
  return `step ${state.step || 0}/${state.total || "?"}${loss}${tail}`;
}

/**
 * The chart between pressing Run and the server's first message for the node. `event`: "queued" (Run pressed),
 * "refused" (the server rejected the graph; `info`: this node's error or null), "failed" (another node's error
 * ended the run first; `info`: its type), "interrupted", "finished" (the run ended without this node: cached
 * or not part of it). Anything but "queued" changes only a chart still waiting.
 */
export function queueTransition(state, event, info = null) {
  if (event === "queued") {
    const previous = state.status === "queued" ? state.previous : { status: state.status, message: state.message };
    return { ...state, status: "queued", message: "waiting for the server", previous };
  }
  if (state.status !== "queued") return state;
  switch (event) {
    case "refused": return { ...state, status: "error", message: info || "not run: the graph was refused (see the error)" };
    case "failed": return { ...state, status: "error", message: `not run: ${info || "another node"} failed first` };
    case "interrupted": return { ...state, status: "stopped", message: "cancelled before training" };
    case "finished": return { ...state, ...(state.previous || { status: "", message: "" }) };
    default: return state;
  }
}

/** This node's errors from a refused queue (`app.lastNodeErrors`), as one bounded line; null when it has none. */
export function nodeQueueError(nodeErrors, nodeId) {
  const entry = nodeErrors && typeof nodeErrors === "object" ? nodeErrors[String(nodeId)] : null;
  if (!entry || !Array.isArray(entry.errors) || !entry.errors.length) return null;
  const text = entry.errors.map((e) => [e && e.message, e && e.details].filter((x) => typeof x === "string" && x).join(": ")).join("; ");
  return boundText(text || "refused", 300);
}

function boundText(text, max) {
  return text.length <= max ? text : text.slice(0, max - 1) + "…";
}

/** The result lines a node sent in `ui.prefalign_text` (strings only, bounded), or [] when it sent none. */
export function textLines(message) {
  const items = message && Array.isArray(message.prefalign_text) ? message.prefalign_text : [];
  const lines = items.filter((t) => typeof t === "string").flatMap((t) => t.split("\n"));
  const out = [];
  let size = 0;
  for (const line of lines) {
    if (out.length >= MAX_TEXT_LINES || size >= MAX_TEXT_CHARS) { out.push("…"); break; }
    const kept = boundText(line, MAX_TEXT_CHARS - size);
    out.push(kept);
    size += kept.length;
  }
  return out;
}

/** Rows `lines` take when wrapped at `width` px (12 px sans-serif: about 6.6 px a character). */
export function textRows(lines, width, charWidth = 6.6) {
  const perRow = Math.max(10, Math.floor(width / charWidth));
  return lines.reduce((rows, line) => rows + Math.max(1, Math.ceil(line.length / perRow)), 0);
}

/**
 * A gallery batch as a graph or the server describes it ({store, batch, prompt, count}), checked: null when the
 * store or batch id breaks the server's rules or count is not a positive integer; count capped at MAX_TILES.
 */
export function sanitizeBatch(batch) {
  if (!batch || typeof batch !== "object") return null;
  const { store, batch: id, prompt, count } = batch;
  if (typeof store !== "string" || !STORE_NAME.test(store) || store.includes("..")) return null;
  if (typeof id !== "string" || !BATCH_ID.test(id)) return null;
  if (!Number.isInteger(count) || count < 1) return null;
  return { store, batch: id, prompt: typeof prompt === "string" ? boundText(prompt, 2000) : "", count: Math.min(count, MAX_TILES) };
}

/** Columns of square tiles that make `count` images as large as fits in width x height (gap px between tiles). */
export function gridLayout(count, width, height, gap = 4) {
  let best = { columns: 1, side: 0 };
  for (let columns = 1; columns <= Math.max(1, count); columns++) {
    const rows = Math.ceil(count / columns);
    const side = Math.floor(Math.min((width - gap * (columns - 1)) / columns, (height - gap * (rows - 1)) / rows));
    if (side > best.side) best = { columns, side };
  }
  return best;
}

// ---------------------------------------------------------------- which methods fit the connected model
// loader node type -> [widget naming the file, ComfyUI models folder]
export const MODEL_LOADERS = {
  CheckpointLoaderSimple: ["ckpt_name", "checkpoints"],
  UNETLoader: ["unet_name", "diffusion_models"],
};
const FLOW_PATCHES = new Set(["ModelSamplingSD3", "ModelSamplingFlux", "ModelSamplingAuraFlow"]);
const DISCRETE_SAMPLINGS = { eps: "epsilon", v_prediction: "v_prediction" };

/** Follow `node`'s `model` input up to the loader of the file. `upstream(node, inputName)` gives the node feeding
 *  that input, or null. Returns {folder, name, sampling} or null when no known loader is reached. Sampling patches
 *  are applied in graph order, so the one nearest the Train node (met first here) decides. */
export function modelSource(node, upstream, maxHops = 32) {
  let sampling = "";
  let current = upstream(node, "model");
  for (let hop = 0; current && hop < maxHops; hop++) {
    const widget = (name) => (current.widgets || []).find((w) => w.name === name);
    const loader = MODEL_LOADERS[current.type];
    if (loader) {
      const file = widget(loader[0]);
      return file && typeof file.value === "string" && file.value ? { folder: loader[1], name: file.value, sampling } : null;
    }
    if (!sampling && FLOW_PATCHES.has(current.type)) sampling = "flow";
    if (!sampling && current.type === "ModelSamplingDiscrete") sampling = DISCRETE_SAMPLINGS[(widget("sampling") || {}).value] || "";
    const input = (current.inputs || []).find((i) => i.type === "MODEL");
    current = input ? upstream(current, input.name) : null;
  }
  return null;
}

/** The line the Train node shows for the probe of its model (`/prefalign/model_methods`) and the chosen method:
 *  {text, refused} where `refused` is the reason the chosen method does not train this model, or "". */
export function fitText(probe, method) {
  if (!probe || typeof probe !== "object") return { text: "", refused: "" };
  const label = String(probe.label || "this model").slice(0, 80);
  if (!probe.prediction_type) return { text: `${label}: ${String(probe.error || "not a model the trainer trains").slice(0, 300)}`, refused: "" };
  const methods = probe.methods && typeof probe.methods === "object" ? probe.methods : {};
  const fit = Object.keys(methods).filter((m) => methods[m] === null);
  const not = Object.keys(methods).filter((m) => methods[m] !== null);
  const text = `${label} (${probe.prediction_type}): ${fit.join(", ") || "no method"} train it` + (not.length ? `; ${not.join(", ")} do not` : "");
  const reason = methods[method];
  return { text, refused: typeof reason === "string" ? reason.slice(0, 400) : "" };
}
