// Drive ComfyUI's real frontend with Playwright and Debian's chromium (never a downloaded browser).
//   node tests/comfyui/browser_test.mjs http://127.0.0.1:PORT OUT_DIR STORE
// Loads workflows/prefalign_curate.json as drag-and-drop would, runs it (sized for CPU), marks images with
// the mouse and the keyboard, reloads the page (the marks come back from the server), then loads the train
// workflow and watches the live loss chart. Prints one JSON line with what it saw; screenshots go to OUT_DIR.
import { chromium } from "playwright-core";
import { readFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const [url, outDir, store] = process.argv.slice(2);
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
mkdirSync(outDir, { recursive: true });
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const result = { errors: [] };

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
const page = await browser.newPage({ viewport: { width: 1700, height: 1000 } });
page.on("pageerror", (e) => result.errors.push(String(e.stack || e).split("\n").slice(0, 4).join(" | ")));
page.on("console", (m) => { if (m.type() === "error" && /prefalign/i.test(m.text())) result.errors.push(m.text()); });

async function dismissDialogs() {
  // first start opens the template browser; close any dialog so clicks reach the graph
  for (let i = 0; i < 5; i++) {
    if (!(await page.$(".p-dialog-mask"))) return;
    await page.keyboard.press("Escape");
    await page.waitForTimeout(400);
  }
}

async function boot() {
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 90000 });
  await page.waitForTimeout(1500);
  await dismissDialogs();
}

async function loadWorkflow(name, edits) {
  const wf = JSON.parse(readFileSync(join(root, "workflows", name), "utf8"));
  return page.evaluate(async ({ wf, edits }) => {
    await window.app.loadGraphData(wf);
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    const missing = nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type);
    for (const [type, name, value] of edits) {
      for (const n of nodes.filter((x) => x.type === type)) {
        const w = n.widgets.find((x) => x.name === name);
        if (w) w.value = value;
      }
    }
    window.app.graph.setDirtyCanvas(true, true);
    return { missing, count: nodes.length };
  }, { wf, edits });
}

const small = [
  ["CheckpointLoaderSimple", "ckpt_name", "tiny_sd15.safetensors"],
  ["EmptyLatentImage", "width", 64], ["EmptyLatentImage", "height", 64],
  ["KSampler", "steps", 3], ["PrefAlignGalleryPicker", "store", store], ["PrefAlignLoadStore", "store", store],
];

await boot();
result.curate = await loadWorkflow("prefalign_curate.json", small);
await dismissDialogs();
await page.evaluate(() => window.app.queuePrompt(0, 1));
await page.waitForSelector(".prefalign-gallery .pa-tile img", { timeout: 120000 });
await page.waitForFunction(() => [...document.querySelectorAll(".prefalign-gallery .pa-tile img")].every((i) => i.complete && i.naturalWidth > 0), null, { timeout: 60000 });
const tiles = await page.$$(".prefalign-gallery .pa-tile");
result.tiles = tiles.length;
await tiles[0].click();                      // left click: chosen
await tiles[1].click({ button: "right" });   // right click: rejected
await page.focus(".prefalign-gallery");
await page.keyboard.press("ArrowRight");     // cursor 1 -> 2
await page.keyboard.press("r");              // rejected
await page.keyboard.press("ArrowRight");     // -> 3
await page.keyboard.press("c");              // chosen
await page.waitForFunction(() => /· saved$/.test(document.querySelector(".prefalign-gallery .pa-status").textContent), null, { timeout: 30000 });
result.status = await page.textContent(".prefalign-gallery .pa-status");
await page.screenshot({ path: join(outDir, "gallery.png") });

// close and reopen the page: marks come back from the server
await page.reload({ waitUntil: "domcontentloaded" });
await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 90000 });
await page.waitForTimeout(1000);
await dismissDialogs();
await page.waitForFunction(() => {
  const s = document.querySelector(".prefalign-gallery .pa-status");
  return s && /2 chosen, 2 rejected/.test(s.textContent);
}, null, { timeout: 60000 }).then(() => { result.restored = true; }, () => { result.restored = false; });
result.restoredStatus = await page.textContent(".prefalign-gallery .pa-status").catch(() => null);
await page.screenshot({ path: join(outDir, "gallery_after_reload.png") });

// train: live loss chart
result.train = await loadWorkflow("prefalign_train.json", [
  ...small, ["PrefAlignTrainLoRA", "steps", 4], ["PrefAlignTrainLoRA", "resolution", 64],
  ["PrefAlignTrainLoRA", "checkpoint_every", 0], ["PrefAlignTrainLoRA", "lora_name", "browser"],
  ["PrefAlignTrainLoRA", "gradient_accumulation_steps", 1],
]);
// choosing another method fills in its default hyper-parameters
result.methodArgs = await page.evaluate(async () => {
  const node = (window.app.graph._nodes || window.app.graph.nodes).find((n) => n.type === "PrefAlignTrainLoRA");
  const method = node.widgets.find((w) => w.name === "method");
  const args = node.widgets.find((w) => w.name === "method_args");
  const pick = async (v) => { method.value = v; await method.callback(v); return args.value; };
  const kto = await pick("kto");
  const dpo = await pick("dpo");
  return { kto, dpo };
});
await page.evaluate(() => window.app.queuePrompt(0, 1));
await page.waitForFunction(() => {
  // this run's file ("browser_..."): the chart may first show an earlier run of the same node id
  const c = document.querySelector(".prefalign-chart div");
  return c && /\(done: prefalign\/browser_/.test(c.textContent);
}, null, { timeout: 300000 }).then(() => { result.trained = true; }, () => { result.trained = false; });
result.chart = await page.textContent(".prefalign-chart div").catch(() => null);
await page.screenshot({ path: join(outDir, "train.png") });
await browser.close();
console.log(JSON.stringify(result));
