// Pictures of the shipped workflows for ComfyUI's template browser, which asks for `<name>.jpg` beside each
// workflow: each graph loaded in the real frontend, fitted to the window, the canvas saved as a small JPEG.
//   node tests/comfyui/make_thumbnails.mjs http://127.0.0.1:PORT
// (a ComfyUI with this pack, e.g. `python tests/comfyui/comfy_server.py BASE`; Debian's chromium, `npm install` here)
import { readdirSync } from "node:fs";
import { join } from "node:path";

import { boot, dismissDialogs, fitGraph, hideCanvasChrome, launch, loadWorkflow, workflowDir } from "./browser_tools.mjs";

const [url] = process.argv.slice(2);
const { browser, page } = await launch({ width: 1024, height: 640 });
await boot(page, url);
await hideCanvasChrome(page);
for (const name of readdirSync(workflowDir).filter((n) => n.endsWith(".json")).sort()) {
  const { missing } = await loadWorkflow(page, name);
  if (missing.length) throw new Error(`${name}: missing node types ${missing}`);
  await dismissDialogs(page);
  await fitGraph(page);
  const out = join(workflowDir, name.replace(/\.json$/, ".jpg"));
  await page.locator(".graph-canvas-panel").screenshot({ path: out, type: "jpeg", quality: 75 });
  console.log("wrote", out);
}
await browser.close();
