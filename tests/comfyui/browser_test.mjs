// Drive ComfyUI's real frontend with Playwright and Debian's chromium (never a downloaded browser).
//   node tests/comfyui/browser_test.mjs http://127.0.0.1:PORT OUT_DIR STORE CURATE.json TRAIN.json COMPARE.json
// Curate: run the workflow, Run again (a new batch: the seed is randomized), mark with mouse and keys, grow the
// node (the thumbnails grow), view an image full size, reload (the marks come back), load a crafted workflow
// (a bounded number of image requests). Train: type a paper-scale learning rate, watch the live chart, see the
// result text, then an argument error and a refused learning rate replace "done". Compare: the loaded LoRA's
// metadata on the node. Node search and the template browser. Prints one JSON line with what it saw;
// screenshots go to OUT_DIR.
import { mkdirSync } from "node:fs";
import { join } from "node:path";

import {
  boot, dismissDialogs, focusNode, launch, loadWorkflow, nodeIdOf, queue, typeIntoWidget, watchErrors,
} from "./browser_tools.mjs";

const [url, outDir, store, CURATE, TRAIN, COMPARE] = process.argv.slice(2);
mkdirSync(outDir, { recursive: true });
const { browser, page } = await launch();
const result = { errors: watchErrors(page) };
const shot = (name) => page.screenshot({ path: join(outDir, name) });

const small = [
  ["CheckpointLoaderSimple", "ckpt_name", "tiny_sd15.safetensors"],
  ["EmptyLatentImage", "width", 64], ["EmptyLatentImage", "height", 64],
  ["KSampler", "steps", 3], ["PrefAlignGalleryPicker", "store", store], ["PrefAlignLoadStore", "store", store],
];
const GALLERY = ".prefalign-gallery";

async function galleryBatch(id) {
  return page.evaluate((id) => {
    const n = window.app.graph.getNodeById(id);
    return n.properties && n.properties.prefalign_batch ? n.properties.prefalign_batch.batch : null;
  }, id);
}

async function waitTiles(batch) {
  await page.waitForFunction(({ sel, batch }) => {
    const node = (window.app.graph._nodes || window.app.graph.nodes).find((n) => n.prefalignGallery);
    const imgs = [...document.querySelectorAll(`${sel} .pa-tile img`)];
    return node && node.prefalignGallery.batch && node.prefalignGallery.batch.batch === batch
      && imgs.length && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, { sel: GALLERY, batch }, { timeout: 120000 });
}

const seedOf = () => page.evaluate(() =>
  (window.app.graph._nodes || window.app.graph.nodes).find((n) => n.type === "KSampler").widgets.find((w) => w.name === "seed").value);
const tileWidth = () => page.$eval(`${GALLERY} .pa-tile`, (t) => t.getBoundingClientRect().width);

// ---------------------------------------------------------------- curate
await boot(page, url);
result.curate = await loadWorkflow(page, CURATE, small);
await dismissDialogs(page);
const galleryId = await nodeIdOf(page, "PrefAlignGalleryPicker");
const seeds = [await seedOf()];
await queue(page);
await page.waitForFunction((id) => { const n = window.app.graph.getNodeById(id); return n.properties && n.properties.prefalign_batch; }, galleryId, { timeout: 120000 });
const first = await galleryBatch(galleryId);
await waitTiles(first);
seeds.push(await seedOf());
await queue(page); // Run again: the randomized seed makes a new batch (a fixed one returns the cached batch)
await page.waitForFunction(({ id, first }) => {
  const n = window.app.graph.getNodeById(id);
  return n.properties.prefalign_batch.batch !== first;
}, { id: galleryId, first }, { timeout: 120000 }).catch(() => {});
const second = await galleryBatch(galleryId);
if (second !== first) await waitTiles(second);
seeds.push(await seedOf());
result.runAgain = { first, second, seeds };

const tiles = await page.$$(`${GALLERY} .pa-tile`);
result.tiles = tiles.length;
await tiles[0].click();                      // left click: chosen
await tiles[1].click({ button: "right" });   // right click: rejected
await page.focus(GALLERY);
await page.keyboard.press("ArrowRight");     // cursor 1 -> 2
await page.keyboard.press("r");              // rejected
await page.keyboard.press("ArrowRight");     // -> 3
await page.keyboard.press("c");              // chosen
await page.waitForFunction((sel) => /· saved$/.test(document.querySelector(`${sel} .pa-status`).textContent), GALLERY, { timeout: 30000 });
result.status = await page.textContent(`${GALLERY} .pa-status`);
await shot("gallery.png");

// thumbnails grow with the node; V shows one full size, Ctrl+hover too
await focusNode(page, galleryId, 90, 90, 0.8);
const before = await tileWidth();
await page.evaluate((id) => { const n = window.app.graph.getNodeById(id); n.setSize([1100, 1000]); window.app.graph.setDirtyCanvas(true, true); }, galleryId);
await page.waitForFunction(({ sel, before }) => document.querySelector(`${sel} .pa-tile`).getBoundingClientRect().width > before * 1.5,
  { sel: GALLERY, before }, { timeout: 10000 }).catch(() => {});
result.growth = { before, after: await tileWidth() };
const grown = await page.$$(`${GALLERY} .pa-tile`);
await page.focus(GALLERY);
await grown[1].hover();
await page.keyboard.press("v");
const previewImg = ".prefalign-preview img";
await page.waitForFunction((sel) => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0; }, previewImg, { timeout: 10000 }).catch(() => {});
result.preview = await page.$eval(previewImg, (i) => ({ shown: i.getBoundingClientRect().width, natural: i.naturalWidth,
  caption: i.nextSibling.textContent })).catch(() => null);
await shot("gallery_preview.png");
await page.keyboard.press("Escape");
result.previewClosed = (await page.$(".prefalign-preview")) === null;
await page.mouse.move(5, 500);
await page.keyboard.down("Control");
await grown[2].hover();
result.ctrlHover = (await page.$(".prefalign-preview")) !== null;
await page.keyboard.up("Control");
result.ctrlReleased = (await page.$(".prefalign-preview")) === null;
await shot("gallery_grown.png");

// close and reopen the page: marks come back from the server
await boot(page, url);
await page.waitForFunction((sel) => {
  const s = document.querySelector(`${sel} .pa-status`);
  return s && /2 chosen, 2 rejected/.test(s.textContent);
}, GALLERY, { timeout: 60000 }).then(() => { result.restored = true; }, () => { result.restored = false; });
result.restoredStatus = await page.textContent(`${GALLERY} .pa-status`).catch(() => null);
await shot("gallery_after_reload.png");

// a crafted workflow: its saved batch claims 3000 images (then -1); the page asks the server, not the file
const imageRequests = [];
page.on("request", (r) => { if (r.url().includes("/prefalign/image?")) imageRequests.push(r.url()); });
await loadWorkflow(page, CURATE, small, [["PrefAlignGalleryPicker", "prefalign_batch", { store, batch: second, prompt: "x", count: 3000 }]]);
await page.waitForTimeout(3000);
const craftedTiles = (await page.$$(`${GALLERY} .pa-tile`)).length;
await loadWorkflow(page, CURATE, small, [["PrefAlignGalleryPicker", "prefalign_batch", { store, batch: second, prompt: "x", count: -1 }]]);
await page.waitForTimeout(1500);
result.crafted = { requests: imageRequests.length, tiles: craftedTiles, negative: await page.textContent(`${GALLERY} .pa-status`) };

// ---------------------------------------------------------------- train
result.train = await loadWorkflow(page, TRAIN, [
  ...small, ["PrefAlignTrainLoRA", "steps", 4], ["PrefAlignTrainLoRA", "resolution", 64],
  ["PrefAlignTrainLoRA", "checkpoint_every", 0], ["PrefAlignTrainLoRA", "lora_name", "browser"],
  ["PrefAlignTrainLoRA", "gradient_accumulation_steps", 1],
]);
await dismissDialogs(page);
const trainId = await nodeIdOf(page, "PrefAlignTrainLoRA");
// choosing another method fills in its default hyper-parameters
result.methodArgs = await page.evaluate(async (id) => {
  const node = window.app.graph.getNodeById(id);
  const method = node.widgets.find((w) => w.name === "method");
  const args = node.widgets.find((w) => w.name === "method_args");
  const pick = async (v) => { method.value = v; await method.callback(v); return args.value; };
  const kto = await pick("kto");
  const dpo = await pick("dpo");
  return { kto, dpo };
}, trainId);
// a paper-scale learning rate, typed as a person does (a FLOAT widget rounds it to its precision)
await focusNode(page, trainId, 300, 60, 1);
await typeIntoWidget(page, trainId, "learning_rate", "5e-7");
result.learningRate = await page.evaluate(async (id) => (await window.app.graphToPrompt()).output[String(id)].inputs.learning_rate, trainId);
await typeIntoWidget(page, trainId, "learning_rate", "0.05"); // big enough for 4 steps to move
const chart = ".prefalign-chart div";
const chartText = () => page.textContent(chart).catch(() => null);
// before any run: which methods train the checkpoint the graph loads (read from the file's header)
await page.waitForFunction(() => /train it/.test((document.querySelector(".prefalign-chart .pa-fit") || {}).textContent || ""), null, { timeout: 30000 }).catch(() => {});
result.fit = await page.textContent(".prefalign-chart .pa-fit").catch(() => null);
await queue(page);
await page.waitForFunction((sel) => {
  // this run's file ("browser_..."): the chart may first show an earlier run of the same node id
  const c = document.querySelector(sel);
  return c && /\(done: prefalign\/browser_/.test(c.textContent);
}, chart, { timeout: 300000 }).then(() => { result.trained = true; }, () => { result.trained = false; });
result.chart = await chartText();
const textOf = (id) => page.evaluate((id) => {
  const el = window.app.graph.getNodeById(id).prefalignText;
  if (!el) return null;
  const r = el.getBoundingClientRect();
  const hit = document.elementFromPoint(r.x + r.width / 2, r.y + Math.min(8, r.height / 2));
  return { text: el.textContent, width: r.width, height: r.height, onTop: !!hit && el.contains(hit),
    fits: el.scrollHeight <= el.clientHeight + 2 };
}, id);
await page.waitForFunction((id) => { const el = window.app.graph.getNodeById(id).prefalignText; return el && el.textContent; }, trainId, { timeout: 30000 }).catch(() => {});
result.trainText = await textOf(trainId);
await page.mouse.move(5, 990); // no tooltip over the node
await shot("train.png");
const lora = (result.chart || "").match(/done: (prefalign\/browser_\S+\.safetensors)/);

// an argument error while the chart shows "done": the chart shows the error instead
await page.evaluate((id) => { window.app.graph.getNodeById(id).widgets.find((w) => w.name === "method_args").value = "gamma = 1"; }, trainId);
await queue(page);
await page.waitForFunction((sel) => /\(error: .*gamma/.test(document.querySelector(sel).textContent), chart, { timeout: 60000 }).catch(() => {});
result.argumentError = await chartText();
await dismissDialogs(page);
await page.evaluate((id) => { window.app.graph.getNodeById(id).widgets.find((w) => w.name === "method_args").value = "beta = 5000"; }, trainId);
await typeIntoWidget(page, trainId, "learning_rate", "0"); // refused when queued (VALIDATE_INPUTS): the node never runs
await queue(page);
await page.waitForFunction((sel) => /\(error: .*learning_rate/.test(document.querySelector(sel).textContent), chart, { timeout: 30000 }).catch(() => {});
result.refused = await chartText();
await dismissDialogs(page);
result.staleText = await page.evaluate((id) => window.app.graph.getNodeById(id).prefalignText.classList.contains("pa-stale"), trainId);
await page.mouse.move(5, 990);
await shot("train_refused.png");

// ---------------------------------------------------------------- compare: Load Preference LoRA's text
result.compare = await loadWorkflow(page, COMPARE, [...small, ["PrefAlignLoadLoRA", "lora_name", lora ? lora[1] : "missing"]]);
await dismissDialogs(page);
const loaderId = await nodeIdOf(page, "PrefAlignLoadLoRA");
await queue(page);
await page.waitForFunction((id) => { const el = window.app.graph.getNodeById(id).prefalignText; return el && /method: dpo/.test(el.textContent); },
  loaderId, { timeout: 120000 }).catch(() => {});
await focusNode(page, loaderId, 300, 100, 1);
result.loraText = await textOf(loaderId);
await shot("compare.png");

// ---------------------------------------------------------------- node search and template browser
await page.evaluate(() => window.app.graph.clear());
result.search = {};
for (const query of ["dpo", "preference"]) {
  for (let attempt = 0; ; attempt++) {  // the previous search box may still be closing: a double click can land on it
    await page.mouse.dblclick(900, 500);
    try { await page.waitForSelector("input:focus", { timeout: 5000 }); break; } catch (e) { if (attempt === 2) throw e; }
    await page.keyboard.press("Escape");
  }
  await page.keyboard.type(query);
  await page.waitForTimeout(1200);
  result.search[query] = await page.$$eval(".p-autocomplete-option", (els) => els.map((e) => e.textContent));
  if (query === "dpo") await shot("search.png");
  await page.keyboard.press("Escape");
  await page.waitForTimeout(400);
}
await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
await page.waitForSelector(".p-dialog li.p-listbox-option", { timeout: 30000 });
await page.locator(".p-dialog li.p-listbox-option", { hasText: /^prefalign$/ }).click();
await page.waitForTimeout(1500);
await page.waitForFunction(() => [...document.querySelectorAll(".p-dialog img")].every((i) => i.complete), null, { timeout: 20000 }).catch(() => {});
result.templates = await page.$$eval(".p-dialog h3.line-clamp-2", (hs) => hs.map((h) => {
  const card = h.closest(".p-card") || h.parentElement.parentElement.parentElement;
  const imgs = [...card.querySelectorAll("img")];
  return { title: h.textContent.trim(), images: imgs.map((i) => ({ src: i.getAttribute("src"), loaded: i.complete && i.naturalWidth > 0 })) };
}));
await shot("templates.png");
await browser.close();
console.log(JSON.stringify(result));
