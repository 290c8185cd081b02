// Swiss-tournament ordering of side-by-side judgements (no DOM, no ComfyUI imports: `node --test tests/web/`).
// ComfyUI imports every .js file under WEB_DIRECTORY; this one only defines things.
//
// A batch of n images plays ceil(log2 n) rounds. In each round images are sorted by points (a win is 1 point;
// ties broken by the sum of the opponents' points, then by the starting order) and the top image still free is
// paired with the next free one it has not met yet; with an odd count the last free image sits the round out.
// So strong images meet strong ones early and about n/2 * log2(n) judgements rank the batch, against n(n-1)/2
// for every pair (16 images: 32 instead of 120). A skipped match counts as played with no winner.

export class Tournament {
  /** `order`: starting order of the images (e.g. by a scorer's suggestion), best first; default 0..n-1. */
  constructor(n, { rounds = null, order = null } = {}) {
    if (!Number.isInteger(n) || n < 2) throw new Error(`a tournament needs at least 2 images, got ${n}`);
    this.n = n;
    this.rounds = rounds ?? Math.ceil(Math.log2(n));
    this.order = order ? [...order] : [...Array(n).keys()];
    if (this.order.length !== n || new Set(this.order).size !== n || this.order.some((i) => !(i >= 0 && i < n))) {
      throw new Error("order must list every image once");
    }
    this.round = 0;
    this.queue = [];
    this.history = []; // {a, b, round, outcome: "left" | "right" | "skip", pair}
  }

  points() {
    const p = Array(this.n).fill(0);
    for (const h of this.history) {
      if (h.outcome === "left") p[h.a] += 1;
      else if (h.outcome === "right") p[h.b] += 1;
    }
    return p;
  }

  met(a, b) {
    return this.history.some((h) => (h.a === a && h.b === b) || (h.a === b && h.b === a));
  }

  /** Images best first: points, then the opponents' points (Buchholz), then the starting order. */
  standings() {
    const p = this.points();
    const buchholz = Array(this.n).fill(0);
    for (const h of this.history) { buchholz[h.a] += p[h.b]; buchholz[h.b] += p[h.a]; }
    const start = new Map(this.order.map((img, rank) => [img, rank]));
    return [...Array(this.n).keys()].sort((x, y) => p[y] - p[x] || buchholz[y] - buchholz[x] || start.get(x) - start.get(y));
  }

  pairRound() {
    const free = this.standings();
    const matches = [];
    while (free.length > 1) {
      const a = free.shift();
      let j = free.findIndex((b) => !this.met(a, b));
      if (j < 0) j = 0; // everyone left has met `a`: a rematch beats sitting out
      matches.push([a, free.splice(j, 1)[0]]);
    }
    return matches;
  }

  /** The next [left, right] to judge, or null when the tournament is over. */
  current() {
    while (!this.queue.length) {
      if (this.round >= this.rounds) return null;
      this.round += 1;
      this.queue = this.pairRound();
    }
    return this.queue[0];
  }

  /** Record the outcome of the current match; `pair` is what the store answered (its pair id), if anything. */
  record(outcome, pair = null) {
    if (!["left", "right", "skip"].includes(outcome)) throw new Error(`unknown outcome ${outcome}`);
    const match = this.current();
    if (!match) throw new Error("the tournament is over");
    this.queue.shift();
    this.history.push({ a: match[0], b: match[1], round: this.round, outcome, pair });
  }

  /** Take back the last judgement; it becomes the current match again. Returns it (or null). */
  undo() {
    const last = this.history.pop();
    if (!last) return null;
    if (last.round !== this.round) { // the judgement closed the previous round: reopen that round
      this.round = last.round;
      this.queue = [];
    }
    this.queue.unshift([last.a, last.b]);
    return last;
  }

  /** How many judgements the tournament takes in all (skips included), and how many are done. */
  progress() {
    return { done: this.history.length, total: this.rounds * Math.floor(this.n / 2), round: this.round, rounds: this.rounds };
  }
}

/** Keyboard shortcuts of the comparison view -> action. */
export function compareKey(key) {
  switch (key) {
    case "ArrowLeft": case "a": case "A": case "1": return "left";
    case "ArrowRight": case "d": case "D": case "2": return "right";
    case "ArrowDown": case "s": case "S": case " ": case "0": return "skip";
    case "u": case "U": case "Backspace": return "undo";
    case "Escape": case "q": case "Q": return "close";
    default: return null;
  }
}
