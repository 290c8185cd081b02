// PrefAlign web logic with no DOM and no ComfyUI imports: tested with `node --test tests/web/`.
// ComfyUI imports every .js file under WEB_DIRECTORY; this one only defines functions.

export const MARKS = ["none", "chosen", "rejected"];

/** Keyboard shortcuts of the gallery picker -> action. */
export function keyAction(key) {
  switch (key) {
    case "c": case "C": case "1": case "Enter": return { type: "mark", mark: "chosen" };
    case "r": case "R": case "2": case "Backspace": return { type: "mark", mark: "rejected" };
    case "x": case "X": case "0": case "Delete": return { type: "mark", mark: "none" };
    case "ArrowRight": case "ArrowDown": case "l": return { type: "move", delta: 1 };
    case "ArrowLeft": case "ArrowUp": case "h": return { type: "move", delta: -1 };
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

/** Merge loss points [step, loss] by step (newest wins), keep at most `max` by even thinning. */
export function mergePoints(points, incoming, max = 2000) {
  const byStep = new Map(points.map((p) => [p[0], p]));
  for (const p of incoming || []) {
    if (Array.isArray(p) && p.length >= 2 && Number.isFinite(p[0]) && Number.isFinite(p[1])) byStep.set(p[0], [p[0], p[1]]);
  }
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
  const tail = state.status && state.status !== "running" ? `  (${state.status}${state.lora ? ": " + state.lora : ""})` : "";
  return `step ${state.step || 0}/${state.total || "?"}${loss}${tail}`;
}
