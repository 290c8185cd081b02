// node --test tests/web/
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  acceptsTrainMessage, chartGeometry, clickMark, createMarkSender, fitText, gridLayout, imageUrl, keyAction, markBody, MAX_TEXT_CHARS,
  MAX_TEXT_LINES, MAX_TILES, mergePoints, modelSource, moveCursor, nextMark, nodeQueueError, pairsFromMarks, progressText,
  queueTransition, sanitizeBatch, smooth, summary, textLines, textRows,
} from "../../web/prefalign_logic.js";

test("keyboard shortcuts", () => {
  assert.deepEqual(keyAction("c"), { type: "mark", mark: "chosen" });
  assert.deepEqual(keyAction("1"), { type: "mark", mark: "chosen" });
  assert.deepEqual(keyAction("r"), { type: "mark", mark: "rejected" });
  assert.deepEqual(keyAction("x"), { type: "mark", mark: "none" });
  assert.deepEqual(keyAction("ArrowRight"), { type: "move", delta: 1 });
  assert.deepEqual(keyAction("ArrowLeft"), { type: "move", delta: -1 });
  assert.equal(keyAction("q"), null);
});

test("marks toggle and mouse buttons", () => {
  assert.equal(nextMark("none", "chosen"), "chosen");
  assert.equal(nextMark("chosen", "chosen"), "none");
  assert.equal(nextMark("chosen", "rejected"), "rejected");
  assert.throws(() => nextMark("none", "best"));
  assert.equal(clickMark({ button: 0 }), "chosen");
  assert.equal(clickMark({ button: 2 }), "rejected");
  assert.equal(clickMark({ button: 0, shiftKey: true }), "rejected");
  assert.equal(moveCursor(0, -1, 4), 3);
  assert.equal(moveCursor(3, 1, 4), 0);
  assert.equal(moveCursor(0, 1, 0), 0);
});

test("every chosen/rejected pairing", () => {
  const marks = ["chosen", "rejected", "chosen", "none", "rejected"];
  assert.deepEqual(pairsFromMarks(marks), [[0, 1], [0, 4], [2, 1], [2, 4]]);
  assert.deepEqual(summary(marks), { chosen: 2, rejected: 2, pairs: 4 });
  assert.deepEqual(pairsFromMarks(["chosen", "chosen"]), []);
});

test("requests carry only store, batch, index, mark", () => {
  const batch = { store: "art", batch: "ab".repeat(16), prompt: "p", count: 3 };
  assert.deepEqual(JSON.parse(markBody(batch, 2, "chosen")), { store: "art", batch: batch.batch, index: 2, mark: "chosen" });
  assert.equal(imageUrl(batch, 1), `/prefalign/image?store=art&batch=${batch.batch}&index=1`);
  assert.equal(imageUrl({ store: "a&b", batch: "x" }, 0), "/prefalign/image?store=a%26b&batch=x&index=0");
});

test("mark sender keeps order and retries until the server answers", async () => {
  const seen = [], states = [];
  let fail = 2;
  const post = async (body) => {
    seen.push(body);
    if (fail-- > 0) throw new Error("offline");
    return { ok: body };
  };
  const sender = createMarkSender(post, (s, pending, err) => states.push([s, pending, err && err.message]), { sleep: async () => {} });
  const a = sender.send("a");
  sender.send("b");
  await a;
  assert.deepEqual(seen, ["a", "a", "a", "b"]);
  assert.deepEqual(states.filter((s) => s[0]).map((s) => s[0].ok), ["a", "b"]);
  assert.equal(sender.pending, 0);
});

test("mark sender gives up after maxRetries and reports it", async () => {
  const errors = [];
  const sender = createMarkSender(async () => { throw new Error("400"); }, (s, p, e) => e && errors.push(e.message),
    { sleep: async () => {}, maxRetries: 2 });
  await sender.send("x");
  assert.equal(errors.length, 3);
  assert.equal(sender.pending, 0);
});

test("train messages are filtered by node", () => {
  assert.ok(acceptsTrainMessage({ node: "7" }, 7));
  assert.ok(!acceptsTrainMessage({ node: "8" }, 7));
  assert.ok(!acceptsTrainMessage(null, 7));
});

test("loss points merge, dedupe, thin", () => {
  let pts = mergePoints([], [[1, 0.7], [2, 0.6]]);
  pts = mergePoints(pts, [[2, 0.65], [3, 0.5], [4, NaN], "junk"]);
  assert.deepEqual(pts, [[1, 0.7], [2, 0.65], [3, 0.5]]);
  const many = Array.from({ length: 5000 }, (_, i) => [i + 1, 1 / (i + 1)]);
  const thin = mergePoints([], many, 100);
  assert.equal(thin.length, 100);
  assert.deepEqual(thin[thin.length - 1], [5000, 1 / 5000]);
  assert.deepEqual(smooth([[1, 1], [2, 0]], 0.5), [[1, 1], [2, 0.5]]);
});

test("chart geometry", () => {
  const g = chartGeometry([[1, 1.0], [3, 0.0]], 200, 100, 10, 3);
  assert.deepEqual(g.lines, [[10, 10], [190, 90]]);
  assert.equal(chartGeometry([], 10, 10).lines.length, 0);
  const flat = chartGeometry([[1, 0.5], [2, 0.5]], 100, 100, 0);
  assert.ok(flat.lines.every(([, y]) => y === 50));
  assert.equal(progressText({ step: 3, total: 10, points: [[3, 0.25]] , status: "running"}), "step 3/10  loss 0.2500");
  assert.match(progressText({ step: 3, total: 10, points: [], status: "done", lora: "prefalign/x.safetensors" }), /done: prefalign/);
});

test("a resumed run's points replace the steps logged after its checkpoint", () => {
  const before = [[1, 0.7], [2, 0.6], [3, 0.5], [4, 0.4]]; // steps 3 and 4 came after the checkpoint at 2
  assert.deepEqual(mergePoints(before, [[3, 0.55]]), [[1, 0.7], [2, 0.6], [3, 0.55]]);
  assert.deepEqual(mergePoints(before, []), before);
  assert.deepEqual(mergePoints(before, [[1, 0.9], [2, 0.8]]), [[1, 0.9], [2, 0.8]]); // a status reload: the server's list
});

test("result text: strings only, bounded", () => {
  assert.deepEqual(textLines({ prefalign_text: ["saved a.safetensors (3 steps)"] }), ["saved a.safetensors (3 steps)"]);
  assert.deepEqual(textLines({ prefalign_text: ["a\nb", 7, null, "c"] }), ["a", "b", "c"]);
  assert.deepEqual(textLines({ text: ["ignored by the frontend"] }), []);
  assert.deepEqual(textLines(null), []);
  assert.deepEqual(textLines({ prefalign_text: "not a list" }), []);
  const many = textLines({ prefalign_text: [Array.from({ length: 500 }, (_, i) => `line ${i}`).join("\n")] });
  assert.equal(many.length, MAX_TEXT_LINES + 1);
  assert.equal(many[many.length - 1], "…");
  const long = textLines({ prefalign_text: ["x".repeat(10 * MAX_TEXT_CHARS)] });
  assert.ok(long.join("").length <= MAX_TEXT_CHARS + 1);
  // the node grows to show every row: a long line wraps
  assert.equal(textRows(["method: dpo", "steps: 4"], 330), 2);
  assert.equal(textRows(["x".repeat(120)], 330), 3);
  assert.equal(textRows([""], 330), 1);
});

test("a gallery batch from a workflow is checked and bounded", () => {
  const id = "ab".repeat(16);
  assert.deepEqual(sanitizeBatch({ store: "art", batch: id, prompt: "p", count: 4 }), { store: "art", batch: id, prompt: "p", count: 4 });
  assert.equal(sanitizeBatch({ store: "art", batch: id, count: 3000 }).count, MAX_TILES);
  assert.equal(MAX_TILES, 64);
  for (const count of [-1, 0, 2.5, "4", NaN, Infinity, null, undefined]) {
    assert.equal(sanitizeBatch({ store: "art", batch: id, count }), null, String(count));
  }
  for (const store of ["../etc", "a/b", "", ".hidden", "a..b", "art\n", 5]) {
    assert.equal(sanitizeBatch({ store, batch: id, count: 1 }), null, String(store));
  }
  for (const batch of ["AB".repeat(16), "ab", "../x", 7]) assert.equal(sanitizeBatch({ store: "art", batch, count: 1 }), null);
  assert.equal(sanitizeBatch(null), null);
  assert.equal(sanitizeBatch("x"), null);
  assert.equal(sanitizeBatch({ store: "art", batch: id, count: 1, prompt: { evil: 1 } }).prompt, "");
});

test("gallery tiles grow with the space", () => {
  assert.deepEqual(gridLayout(4, 420, 300, 4), { columns: 2, side: 148 }); // 2x2 beats 4x1 (101 px)
  assert.deepEqual(gridLayout(4, 900, 900, 4), { columns: 2, side: 448 });
  assert.ok(gridLayout(4, 1200, 1200, 4).side > gridLayout(4, 420, 420, 4).side * 2);
  assert.deepEqual(gridLayout(3, 1000, 200, 0), { columns: 3, side: 200 });
  assert.equal(gridLayout(4, 0, 0).side, 0); // not laid out yet: the caller keeps its default grid
  assert.deepEqual(keyAction("v"), { type: "preview" });
  assert.deepEqual(keyAction(" "), { type: "preview" });
  assert.deepEqual(keyAction("Escape"), { type: "close" });
});

test("the chart between Run and the server: refused, failed, cached", () => {
  const done = { status: "done", lora: "prefalign/a.safetensors", message: "saved", step: 3, total: 3, points: [[3, 0.5]] };
  const queued = queueTransition(done, "queued");
  assert.equal(queued.status, "queued");
  assert.doesNotMatch(progressText(queued), /done/);
  const refused = queueTransition(queued, "refused", "learning_rate '0' is outside 1e-08 .. 1");
  assert.equal(refused.status, "error");
  assert.match(progressText(refused), /\(error: learning_rate '0' is outside/);
  assert.match(queueTransition(queued, "refused", null).message, /refused/);
  assert.match(queueTransition(queued, "failed", "PrefAlignLoadStore").message, /PrefAlignLoadStore failed first/);
  assert.equal(queueTransition(queued, "interrupted").status, "stopped");
  const restored = queueTransition(queueTransition(queued, "queued"), "finished"); // Run twice, then cached
  assert.equal(restored.status, "done");
  assert.equal(queueTransition(done, "refused", "x"), done); // only a waiting chart changes
  const running = { ...queued, status: "running" };
  assert.equal(queueTransition(running, "finished"), running);
});

test("this node's queue errors, bounded", () => {
  const errors = { 12: { errors: [{ message: "Custom validation failed for node", details: "learning_rate - learning_rate 'abc' is not a number" }], class_type: "PrefAlignTrainLoRA" } };
  assert.equal(nodeQueueError(errors, 12), "Custom validation failed for node: learning_rate - learning_rate 'abc' is not a number");
  assert.equal(nodeQueueError(errors, 13), null);
  assert.equal(nodeQueueError(null, 12), null);
  assert.equal(nodeQueueError({ 12: { errors: "junk" } }, 12), null);
  assert.ok(nodeQueueError({ 12: { errors: [{ message: "m".repeat(5000) }] } }, 12).length <= 300);
});

// ------------------------------------------------------------ the connected model's methods
function graphOf(nodes, links) {
  // links: [fromId, toId, inputName]
  const byId = Object.fromEntries(nodes.map((n) => [n.id, n]));
  return (node, input) => {
    const link = links.find(([, to, name]) => to === node.id && name === input);
    return link ? byId[link[0]] : null;
  };
}

test("modelSource follows the model input through LoRA and sampling patches to the loader", () => {
  const train = { id: 1, type: "PrefAlignTrainLoRA", inputs: [{ name: "model", type: "MODEL" }] };
  const lora = { id: 2, type: "LoraLoader", inputs: [{ name: "model", type: "MODEL" }, { name: "clip", type: "CLIP" }] };
  const near = { id: 3, type: "ModelSamplingDiscrete", inputs: [{ name: "model", type: "MODEL" }], widgets: [{ name: "sampling", value: "v_prediction" }] };
  const far = { id: 4, type: "ModelSamplingSD3", inputs: [{ name: "model", type: "MODEL" }], widgets: [{ name: "shift", value: 3 }] };
  const unet = { id: 5, type: "UNETLoader", widgets: [{ name: "unet_name", value: "flux1-dev.safetensors" }, { name: "weight_dtype", value: "fp8_e4m3fn" }] };
  const upstream = graphOf([train, lora, near, far, unet], [[2, 1, "model"], [3, 2, "model"], [4, 3, "model"], [5, 4, "model"]]);
  assert.deepEqual(modelSource(train, upstream), { folder: "diffusion_models", name: "flux1-dev.safetensors", sampling: "v_prediction" });
  const direct = graphOf([train, far, unet], [[4, 1, "model"], [5, 4, "model"]]);
  assert.deepEqual(modelSource(train, direct), { folder: "diffusion_models", name: "flux1-dev.safetensors", sampling: "flow" });
  const ckpt = { id: 6, type: "CheckpointLoaderSimple", widgets: [{ name: "ckpt_name", value: "sd15.safetensors" }] };
  assert.deepEqual(modelSource(train, graphOf([train, ckpt], [[6, 1, "model"]])), { folder: "checkpoints", name: "sd15.safetensors", sampling: "" });
});

test("modelSource gives up on unknown loaders, missing links and cycles", () => {
  const train = { id: 1, type: "PrefAlignTrainLoRA", inputs: [{ name: "model", type: "MODEL" }] };
  const gguf = { id: 2, type: "UnetLoaderGGUF", widgets: [{ name: "unet_name", value: "x.gguf" }] };
  assert.equal(modelSource(train, graphOf([train, gguf], [[2, 1, "model"]])), null);
  assert.equal(modelSource(train, graphOf([train], [])), null);
  const a = { id: 2, type: "LoraLoader", inputs: [{ name: "model", type: "MODEL" }] };
  const b = { id: 3, type: "LoraLoader", inputs: [{ name: "model", type: "MODEL" }] };
  assert.equal(modelSource(train, graphOf([train, a, b], [[2, 1, "model"], [3, 2, "model"], [2, 3, "model"]])), null);
});

test("fitText lists the methods that train the model and says why the chosen one does not", () => {
  const probe = { label: "Flux.1 dev/schnell", prediction_type: "flow", methods: { dpo: null, mapo: "MaPO's score needs a DDPM SNR", sft: null } };
  assert.deepEqual(fitText(probe, "dpo"), { text: "Flux.1 dev/schnell (flow): dpo, sft train it; mapo do not", refused: "" });
  assert.equal(fitText(probe, "mapo").refused, "MaPO's score needs a DDPM SNR");
  assert.equal(fitText({ label: "Cosmos", prediction_type: null, error: "model sampling EDM is not supported" }, "dpo").text,
    "Cosmos: model sampling EDM is not supported");
  assert.deepEqual(fitText(null, "dpo"), { text: "", refused: "" });
});
