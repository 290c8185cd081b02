// Driving ComfyUI's real frontend with Playwright and Debian's chromium (never a downloaded browser):
// what browser_test.mjs, compare_test.mjs and make_thumbnails.mjs share.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const workflowDir = join(root, "example_workflows"); // the folder ComfyUI's template browser serves

export async function launch(viewport = { width: 1700, height: 1000 }, deviceScaleFactor = 1) {
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
  const page = await browser.newPage({ viewport, deviceScaleFactor });
  return { browser, page };
}

/** The page's uncaught errors and the console errors that name prefalign, as they happen (one line each). */
export function watchErrors(page) {
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e.stack || e).split("\n").slice(0, 4).join(" | ")));
  page.on("console", (m) => { if (m.type() === "error" && /prefalign/i.test(m.text())) errors.push(m.text()); });
  return errors;
}

export async function dismissDialogs(page) {
  // the first start opens the template browser; close any dialog so clicks reach the graph
  for (let i = 0; i < 5; i++) {
    if (!(await page.$(".p-dialog-mask"))) return;
    await page.keyboard.press("Escape");
    await page.waitForTimeout(400);
  }
}

export async function boot(page, url) {
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 90000 });
  await page.waitForTimeout(1500);
  await dismissDialogs(page);
}

/**
 * Load example_workflows/NAME as drag-and-drop would. `edits`: [nodeType, widgetName, value] applied after loading;
 * `properties`: [nodeType, key, value] written into the file's node properties first (as a crafted file would).
 */
export async function loadWorkflow(page, name, edits = [], properties = []) {
  const wf = JSON.parse(readFileSync(join(workflowDir, name), "utf8"));
  for (const [type, key, value] of properties) {
    for (const n of wf.nodes.filter((x) => x.type === type)) n.properties = { ...n.properties, [key]: value };
  }
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

/** The canvas alone: no workflow tabs, minimap, zoom buttons or frame-rate text over the graph; titles and widgets drawn at any zoom. */
export async function hideCanvasChrome(page) {
  await page.addStyleTag({ content: ".minimap-main-container, .workflow-tabs-container, .graph-canvas-panel .p-buttongroup { display: none !important; }" });
  await page.evaluate(async () => {
    window.app.canvas.show_info = false;
    await window.app.extensionManager.setting.set("LiteGraph.Canvas.MinFontSizeForLOD", 0); // 0: never the low-detail drawing
  });
}

/** Scale and move the canvas so every node fits in the window with `margin` px around. */
export async function fitGraph(page, margin = 24) {
  await page.evaluate((margin) => {
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const panel = document.querySelector(".graph-canvas-panel").getBoundingClientRect();
    const canvas = window.app.canvas.canvas.getBoundingClientRect(); // may extend under the tabs and the side bar
    const scale = Math.min((panel.width - 2 * margin) / (x1 - x0), (panel.height - 2 * margin) / (y1 - y0));
    const ds = window.app.canvas.ds;
    ds.scale = scale;
    ds.offset = [(panel.x - canvas.x + margin) / scale - x0, (panel.y - canvas.y + margin) / scale - y0];
    window.app.graph.setDirtyCanvas(true, true);
  }, margin);
  await page.waitForTimeout(500);
}

/** Put node `id`'s top-left corner at (x, y) px of the canvas at the given scale. */
export async function focusNode(page, id, x = 40, y = 60, scale = 0.8) {
  await page.evaluate(({ id, x, y, scale }) => {
    const node = window.app.graph.getNodeById(id);
    const ds = window.app.canvas.ds;
    ds.scale = scale;
    ds.offset = [x / scale - node.pos[0], y / scale - node.pos[1]];
    window.app.graph.setDirtyCanvas(true, true);
  }, { id, x, y, scale });
  await page.waitForTimeout(400);
}

export const nodeIdOf = (page, type) =>
  page.evaluate((type) => (window.app.graph._nodes || window.app.graph.nodes).find((n) => n.type === type).id, type);

export const queue = (page) => page.evaluate(() => window.app.queuePrompt(0, 1));

/** Type `text` into a canvas-drawn widget the way a person does: click it, type in the frontend's prompt, Enter. */
export async function typeIntoWidget(page, nodeId, widgetName, text) {
  const at = await page.evaluate(({ nodeId, widgetName }) => {
    const n = window.app.graph.getNodeById(nodeId);
    const w = n.widgets.find((x) => x.name === widgetName);
    const r = window.app.canvas.canvas.getBoundingClientRect();
    const [x, y] = window.app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + w.y + (w.computedHeight || 20) / 2]);
    return { x: r.x + x, y: r.y + y };
  }, { nodeId, widgetName });
  await page.mouse.click(at.x, at.y);
  const input = await page.waitForSelector(".graphdialog input", { timeout: 5000 });
  await input.fill(text);
  await page.keyboard.press("Enter");
  await page.waitForTimeout(300);
}
