// Scorer-assisted curation in the Preference Gallery Picker: auto-mark and the side-by-side comparison mode.
//
// Auto-mark asks the server for marks suggested by the scores a Score Images for Preference node computed for this very
// batch and shows them as dashed outlines; "accept" (or key A) applies them through the gallery's own mark
// route, clicking a tile overrides its suggestion, "dismiss" drops them. Nothing is saved until accepted.
// Compare shows two images large, side by side: ← / A / 1 the left is better, → / D / 2 the right, ↓ / S /
// space skip, U / Backspace undo, Esc close. The next pair is chosen Swiss-tournament style
// (prefalign_swiss.js) and every judgement is saved at once as a pair (winner chosen) in the gallery's store.
import { compareKey, Tournament } from "./prefalign_swiss.js";

const STYLE = `
.prefalign-scoring { display:flex; gap:6px; align-items:center; flex-wrap:wrap; }
.prefalign-scoring[hidden] { display:none; }
.prefalign-scoring button { font:12px sans-serif; padding:2px 8px; cursor:pointer; }
.prefalign-scoring .pa-hint { opacity:.8; }
.prefalign-gallery .pa-tile.pa-suggest-chosen { outline:3px dashed #2e9e44; outline-offset:-3px; }
.prefalign-gallery .pa-tile.pa-suggest-rejected { outline:3px dashed #c8323c; outline-offset:-3px; }
.prefalign-gallery .pa-tile .pa-suggest-label { position:absolute; bottom:2px; right:2px; padding:0 4px; border-radius:3px; background:rgba(0,0,0,.65); color:#fff; font-size:11px; }
.prefalign-compare { position:fixed; inset:0; z-index:10000; background:rgba(10,10,12,.94); color:#eee; display:flex; flex-direction:column; align-items:center; justify-content:center; gap:12px; font:14px sans-serif; outline:none; }
.prefalign-compare .pa-pair { display:flex; gap:24px; align-items:center; justify-content:center; }
.prefalign-compare figure { margin:0; display:flex; flex-direction:column; align-items:center; gap:6px; cursor:pointer; }
.prefalign-compare figure img { width:min(42vw, 70vh); height:min(42vw, 70vh); object-fit:contain; image-rendering:pixelated; background:#222; border-radius:6px; border:3px solid transparent; }
.prefalign-compare figure:hover img { border-color:#4a8fe7; }
.prefalign-compare .pa-keys { opacity:.8; }
.prefalign-compare .pa-ranking { display:flex; gap:6px; flex-wrap:wrap; justify-content:center; max-width:90vw; }
.prefalign-compare .pa-ranking img { width:72px; height:72px; object-fit:contain; image-rendering:pixelated; background:#222; }
.prefalign-compare .pa-error { color:#f66; }
`;

/** Add a <style> element with this id and CSS to the page, once (also for web/prefalign.js). */
export function injectStyle(id, css) {
  if (document.getElementById(id)) return;
  const el = document.createElement("style");
  el.id = id;
  el.textContent = css;
  document.head.appendChild(el);
}

function button(text, title, onClick) {
  const b = document.createElement("button");
  b.textContent = text;
  b.title = title;
  b.addEventListener("mousedown", (e) => e.stopPropagation());
  b.addEventListener("click", (e) => { e.preventDefault(); e.stopPropagation(); onClick(); });
  return b;
}

/**
 * Add auto-mark and compare to a gallery (web/prefalign.js's Gallery: `el`, `grid`, `tiles`, `batch`, `marks`,
 * `mark(index, mark)`, `show(batch)`, `layout()`). `fetchJson(path, options)` answers the server's JSON or throws;
 * `imageSrc(batch, index)` is an image's URL.
 */
export function attachScoring(gallery, { fetchJson, imageSrc }) {
  injectStyle("prefalign-compare-style", STYLE);
  const bar = document.createElement("div");
  bar.className = "prefalign-scoring";
  const hint = document.createElement("span");
  hint.className = "pa-hint";
  let suggestions = null;
  const relayout = () => gallery.layout(); // the tiles fill the node's space around the bar
  let scores = null; // the scorer's scores of this batch, once auto-mark fetched them: compare starts from them

  const clearSuggestions = () => {
    suggestions = null;
    (gallery.tiles || []).forEach((tile) => {
      tile.classList.remove("pa-suggest-chosen", "pa-suggest-rejected");
      tile.querySelector(".pa-suggest-label")?.remove();
    });
    accept.hidden = dismiss.hidden = true;
    relayout();
  };
  const drawSuggestions = () => {
    (gallery.tiles || []).forEach((tile, i) => {
      const s = suggestions && suggestions[i];
      tile.classList.toggle("pa-suggest-chosen", s === "chosen");
      tile.classList.toggle("pa-suggest-rejected", s === "rejected");
      tile.querySelector(".pa-suggest-label")?.remove();
      if (s === "chosen" || s === "rejected") {
        const label = document.createElement("span");
        label.className = "pa-suggest-label";
        label.textContent = s === "chosen" ? "auto ✓" : "auto ✗";
        tile.appendChild(label);
      }
    });
  };
  const automark = async () => {
    if (!gallery.batch) return;
    const q = new URLSearchParams({ store: gallery.batch.store, batch: gallery.batch.batch });
    try {
      const answer = await fetchJson(`/prefalign/automark?${q}`);
      suggestions = answer.marks;
      scores = answer.scores;
      drawSuggestions();
      accept.hidden = dismiss.hidden = false;
      hint.textContent = `suggested by ${answer.scorer}: accept (A), override by clicking, or dismiss`;
    } catch (err) {
      hint.textContent = err.message;
    }
    relayout();
  };
  const acceptAll = () => {
    if (!suggestions) return;
    suggestions.forEach((s, i) => { if (s !== "none" && gallery.marks[i] !== s) gallery.mark(i, s); });
    clearSuggestions();
    hint.textContent = "suggestions applied";
  };

  const auto = button("auto-mark", "Pre-mark chosen/rejected from the scores of a Score Images for Preference node before this picker", automark);
  const accept = button("accept", "Apply the suggested marks (key A)", acceptAll);
  const dismiss = button("dismiss", "Drop the suggestions", () => { clearSuggestions(); hint.textContent = ""; });
  const compare = button("compare ⇄", "Judge the batch two images at a time (Swiss tournament); each judgement is saved as a pair",
    () => openCompare(gallery, fetchJson, imageSrc, scores));
  bar.append(auto, accept, dismiss, compare, hint);
  clearSuggestions();
  bar.hidden = true;
  gallery.el.insertBefore(bar, gallery.status || null);

  // a click on a tile is the artist's own mark: that tile's suggestion is overridden
  gallery.grid.addEventListener("mousedown", (e) => {
    const tile = e.target.closest && e.target.closest(".pa-tile");
    if (tile && suggestions) { suggestions[Number(tile.dataset.index)] = "none"; drawSuggestions(); }
  }, true);
  gallery.el.addEventListener("keydown", (e) => {
    if ((e.key === "a" || e.key === "A") && suggestions) { e.preventDefault(); e.stopPropagation(); acceptAll(); }
  });
  const show = gallery.show.bind(gallery);
  gallery.show = async (...args) => {
    clearSuggestions();
    scores = null;
    hint.textContent = "";
    const r = await show(...args);
    bar.hidden = !gallery.batch;
    relayout();
    return r;
  };
}

function openCompare(gallery, fetchJson, imageSrc, scores) {
  const batch = gallery.batch;
  if (!batch || batch.count < 2) return;
  const order = scores && scores.length === batch.count
    ? [...scores.keys()].sort((a, b) => scores[b] - scores[a] || a - b) : null;
  const t = new Tournament(batch.count, { order });
  const view = document.createElement("div");
  view.className = "prefalign-compare";
  view.tabIndex = 0;
  view.innerHTML = `<div class="pa-title"></div><div class="pa-pair"></div><div class="pa-keys">← / A left is better · → / D right is better · ↓ / S skip · U undo · Esc close</div><div class="pa-status"></div>`;
  const title = view.querySelector(".pa-title");
  const pairEl = view.querySelector(".pa-pair");
  const status = view.querySelector(".pa-status");
  let saved = 0;
  let busy = false;

  const figure = (index, side) => {
    const f = document.createElement("figure");
    f.dataset.side = side;
    f.dataset.index = String(index);
    const img = document.createElement("img");
    img.src = imageSrc(batch, index);
    img.draggable = false;
    const cap = document.createElement("figcaption");
    cap.textContent = `${side === "left" ? "←" : "→"} image ${index + 1}`;
    f.append(img, cap);
    f.addEventListener("click", () => judge(side));
    return f;
  };
  const render = () => {
    const match = t.current();
    const p = t.progress();
    title.textContent = `${batch.prompt || "(no prompt)"} — round ${Math.max(1, p.round)} of ${p.rounds}, judgement ${Math.min(p.done + 1, p.total)} of ${p.total}`;
    pairEl.replaceChildren();
    if (match) {
      pairEl.append(figure(match[0], "left"), figure(match[1], "right"));
    } else {
      const ranking = document.createElement("div");
      ranking.className = "pa-ranking";
      for (const i of t.standings()) {
        const img = document.createElement("img");
        img.src = imageSrc(batch, i);
        img.title = `image ${i + 1}`;
        ranking.appendChild(img);
      }
      pairEl.appendChild(ranking);
      title.textContent = `Done: ranking, best first (${saved} pair${saved === 1 ? "" : "s"} saved to "${batch.store}")`;
    }
    status.classList.remove("pa-error");
    status.textContent = `${saved} pair${saved === 1 ? "" : "s"} saved to store "${batch.store}"`;
  };
  const fail = (err) => { status.classList.add("pa-error"); status.textContent = `not saved: ${err.message}`; };
  const post = (path, body) => fetchJson(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

  async function judge(outcome) {
    if (busy || !t.current()) return;
    busy = true;
    try {
      const [left, right] = t.current();
      let pair = null;
      if (outcome !== "skip") {
        const [winner, loser] = outcome === "left" ? [left, right] : [right, left];
        pair = (await post("/prefalign/compare", { store: batch.store, batch: batch.batch, winner, loser })).pair;
        saved += 1;
      }
      t.record(outcome, pair);
      render();
    } catch (err) { fail(err); } finally { busy = false; }
  }
  async function undo() {
    if (busy) return;
    busy = true;
    try {
      const last = t.history[t.history.length - 1];
      if (last && last.pair !== null) {
        await post("/prefalign/compare/undo", { store: batch.store, pair: last.pair });
        saved -= 1;
      }
      t.undo();
      render();
    } catch (err) { fail(err); } finally { busy = false; }
  }
  const close = () => { view.remove(); gallery.el.focus(); };
  view.addEventListener("keydown", (e) => {
    const action = compareKey(e.key);
    if (!action) return;
    e.preventDefault();
    e.stopPropagation();
    if (action === "close") close();
    else if (action === "undo") undo();
    else judge(action);
  });
  view.addEventListener("pointerdown", (e) => e.stopPropagation());
  document.body.appendChild(view);
  render();
  view.focus();
}
