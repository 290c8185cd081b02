// Swiss-tournament ordering of the comparison mode (web/prefalign_swiss.js).
import assert from "node:assert/strict";
import { test } from "node:test";

import { compareKey, Tournament } from "../../web/prefalign_swiss.js";

/** Play a whole tournament with a judge who always prefers the image of higher `quality`. */
function play(t, quality) {
  const judged = [];
  for (let m = t.current(); m; m = t.current()) {
    judged.push(m);
    t.record(quality[m[0]] >= quality[m[1]] ? "left" : "right");
  }
  return judged;
}

test("log2(n) rounds of n/2 judgements, no rematch while avoidable", () => {
  const t = new Tournament(16);
  const judged = play(t, [...Array(16).keys()].map((i) => (i * 7) % 16));
  assert.equal(t.rounds, 4);
  assert.equal(judged.length, 32); // every pair would be 120
  assert.deepEqual(t.progress(), { done: 32, total: 32, round: 4, rounds: 4 });
  const keys = judged.map(([a, b]) => [Math.min(a, b), Math.max(a, b)].join("-"));
  assert.equal(new Set(keys).size, keys.length);
  const games = Array(16).fill(0);
  judged.flat().forEach((i) => { games[i] += 1; });
  assert.ok(games.every((g) => g === 4));
});

test("the best image ends first, and the first round pairs neighbours of the starting order", () => {
  const quality = [3, 9, 1, 7, 5, 0, 8, 2];
  const t = new Tournament(8, { order: [1, 6, 3, 4, 0, 7, 2, 5] });
  assert.deepEqual(t.current(), [1, 6]);
  play(t, quality);
  assert.equal(t.standings()[0], 1);
  assert.deepEqual(t.points().sort((a, b) => b - a), [3, 2, 2, 2, 1, 1, 1, 0]);
});

test("winners meet winners: round 2 pairs images with equal points", () => {
  const t = new Tournament(8);
  play(t, [8, 7, 6, 5, 4, 3, 2, 1].map((q, i) => (i % 2 ? q : -q))); // odd indices win round 1
  const round2 = t.history.filter((h) => h.round === 2);
  const afterRound1 = Array(8).fill(0);
  t.history.filter((h) => h.round === 1).forEach((h) => { afterRound1[h.outcome === "left" ? h.a : h.b] += 1; });
  for (const h of round2) assert.equal(afterRound1[h.a], afterRound1[h.b]);
});

test("an odd batch sits one image out per round; skips score nobody", () => {
  const t = new Tournament(5);
  assert.equal(t.rounds, 3);
  let matches = 0;
  for (let m = t.current(); m; m = t.current()) { t.record("skip"); matches += 1; }
  assert.equal(matches, 6);
  assert.deepEqual(t.points(), [0, 0, 0, 0, 0]);
  assert.equal(t.current(), null);
  assert.throws(() => t.record("left"), /over/);
});

test("undo takes back the last judgement, across a round boundary too", () => {
  const t = new Tournament(4);
  const first = t.current();
  t.record("left", 11);
  t.record("right", 12);
  const round2 = t.current();
  assert.equal(t.round, 2);
  const last = t.undo();
  assert.deepEqual([last.outcome, last.pair, last.round], ["right", 12, 1]);
  assert.equal(t.round, 1);
  t.record("left", 13);
  assert.notDeepEqual(t.current(), undefined);
  t.undo(); t.undo();
  assert.deepEqual(t.current(), first);
  assert.equal(t.history.length, 0);
  assert.equal(t.undo(), null);
  assert.ok(round2);
});

test("keys and bad input", () => {
  assert.equal(compareKey("ArrowLeft"), "left");
  assert.equal(compareKey("d"), "right");
  assert.equal(compareKey(" "), "skip");
  assert.equal(compareKey("Backspace"), "undo");
  assert.equal(compareKey("Escape"), "close");
  assert.equal(compareKey("x"), null);
  assert.throws(() => new Tournament(1), /at least 2/);
  assert.throws(() => new Tournament(3, { order: [0, 0, 1] }), /every image once/);
  assert.throws(() => new Tournament(2).record("draw"), /unknown outcome/);
});
