// node --test tests/web/
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  acceptsTrainMessage, chartGeometry, clickMark, createMarkSender, imageUrl, keyAction, markBody, mergePoints,
  moveCursor, nextMark, pairsFromMarks, progressText, smooth, summary,
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
