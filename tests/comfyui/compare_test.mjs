// Scorer-assisted curation in the real frontend (Playwright with Debian's chromium):
//   node tests/comfyui/compare_test.mjs http://127.0.0.1:PORT OUT_DIR STORE WORKFLOW_NAME
// Loads example_workflows/WORKFLOW_NAME as drag-and-drop would, sized for CPU, runs it, reads the Score Images for Preference
// node's text, auto-marks in the Gallery Picker and accepts, then judges the whole batch in the comparison
// mode (left, right, skip and undo from the keyboard). Prints one JSON line; screenshots go to OUT_DIR.
import { mkdirSync } from "node:fs";
import { join } from "node:path";

import { boot, dismissDialogs, focusNode, launch, loadWorkflow, nodeIdOf, queue, watchErrors } from "./browser_tools.mjs";

const [url, outDir, store, workflow] = process.argv.slice(2);
mkdirSync(outDir, { recursive: true });
const { browser, page } = await launch();
const result = { errors: watchErrors(page) };

await boot(page, url);
result.workflow = await loadWorkflow(page, workflow, [
  ["CheckpointLoaderSimple", "ckpt_name", "tiny_sd15.safetensors"],
  ["EmptyLatentImage", "width", 64], ["EmptyLatentImage", "height", 64], ["KSampler", "steps", 3],
  ["PrefAlignLoadScorer", "clip_model", "tiny-pick"],
  ["PrefAlignPairsFromScores", "margin", 0], ["PrefAlignPairsFromScores", "store", store],
  ["PrefAlignGalleryPicker", "store", store],
  ["PrefAlignTrainLoRA", "steps", 2], ["PrefAlignTrainLoRA", "resolution", 64], ["PrefAlignTrainLoRA", "checkpoint_every", 0],
  ["PrefAlignTrainLoRA", "gradient_accumulation_steps", 1], ["PrefAlignTrainLoRA", "lora_name", "browser_scored"],
]);
await dismissDialogs(page);
await queue(page);

// the Score Images for Preference node shows its scores under its images
const scoreId = await nodeIdOf(page, "PrefAlignScoreImages");
await page.waitForFunction((id) => {
  const n = window.app.graph.getNodeById(id);
  return n && n.prefalignText && /image 8: /.test(n.prefalignText.textContent);
}, scoreId, { timeout: 300000 });
result.scoreText = await page.evaluate((id) => window.app.graph.getNodeById(id).prefalignText.textContent, scoreId);
result.scoreTextVisible = await page.evaluate((id) => {
  const r = window.app.graph.getNodeById(id).prefalignText.getBoundingClientRect();
  return r.width > 0 && r.height > 0;
}, scoreId);
result.scorePreviews = await page.evaluate((id) => {
  const outputs = window.app.nodeOutputs && window.app.nodeOutputs[String(id)];
  return ((outputs && outputs.images) || window.app.graph.getNodeById(id).imgs || []).length;
}, scoreId);
await focusNode(page, scoreId, 40, 60, 1.0);
await page.screenshot({ path: join(outDir, "score_node.png") });

// auto-mark: suggestions drawn, then accepted with A
const galleryId = await nodeIdOf(page, "PrefAlignGalleryPicker");
await page.waitForFunction(() => [...document.querySelectorAll(".prefalign-gallery .pa-tile img")].length === 8
  && [...document.querySelectorAll(".prefalign-gallery .pa-tile img")].every((i) => i.complete && i.naturalWidth > 0), null, { timeout: 300000 });
await focusNode(page, galleryId, 40, 60, 1.0);
await page.click(".prefalign-scoring button:has-text('auto-mark')");
await page.waitForSelector(".pa-tile.pa-suggest-chosen", { timeout: 30000 });
result.suggested = await page.evaluate(() => [...document.querySelectorAll(".prefalign-gallery .pa-tile")].map((t) =>
  t.classList.contains("pa-suggest-chosen") ? "chosen" : t.classList.contains("pa-suggest-rejected") ? "rejected" : "none"));
result.hint = await page.textContent(".prefalign-scoring .pa-hint");
await page.screenshot({ path: join(outDir, "automark_suggested.png") });
await page.focus(".prefalign-gallery");
await page.keyboard.press("a");
await page.waitForFunction(() => /1 chosen, 1 rejected/.test(document.querySelector(".prefalign-gallery .pa-status").textContent)
  && /saved$/.test(document.querySelector(".prefalign-gallery .pa-status").textContent), null, { timeout: 30000 });
result.marked = await page.evaluate(() => window.app.graph._nodes.find((n) => n.type === "PrefAlignGalleryPicker").prefalignGallery.marks);
result.galleryStatus = await page.textContent(".prefalign-gallery .pa-status");
await page.screenshot({ path: join(outDir, "automark_accepted.png") });

// comparison mode: Swiss rounds over the 8 images, keyboard only
await page.click(".prefalign-scoring button:has-text('compare')");
await page.waitForSelector(".prefalign-compare figure img", { timeout: 30000 });
await page.waitForFunction(() => [...document.querySelectorAll(".prefalign-compare figure img")].every((i) => i.complete && i.naturalWidth > 0));
result.compareTitle = await page.textContent(".prefalign-compare .pa-title");
result.compareImages = await page.evaluate(() => [...document.querySelectorAll(".prefalign-compare figure img")].map((i) => i.getBoundingClientRect().width));
await page.screenshot({ path: join(outDir, "compare.png") });
const keys = ["ArrowLeft", "ArrowRight", "ArrowDown", "u", "ArrowLeft"];
const seen = [];
for (let i = 0; i < 40; i++) {
  const pair = await page.evaluate(() => [...document.querySelectorAll(".prefalign-compare figure")].map((f) => Number(f.dataset.index)));
  if (pair.length < 2) break;
  seen.push(pair);
  const before = await page.textContent(".prefalign-compare .pa-title");
  await page.keyboard.press(i < keys.length ? keys[i] : (i % 2 ? "ArrowRight" : "ArrowLeft"));
  await page.waitForFunction((b) => document.querySelector(".prefalign-compare .pa-title").textContent !== b, before, { timeout: 30000 });
}
result.judged = seen;
result.compareDone = await page.textContent(".prefalign-compare .pa-title");
result.compareStatus = await page.textContent(".prefalign-compare .pa-status");
result.ranking = await page.evaluate(() => document.querySelectorAll(".prefalign-compare .pa-ranking img").length);
await page.screenshot({ path: join(outDir, "compare_done.png") });
await page.keyboard.press("Escape");
result.closed = !(await page.$(".prefalign-compare"));
await browser.close();
console.log(JSON.stringify(result));
