// The browser bundle: dist/pushgrid.js, one file, a global `pushgrid` (also
// what `pushgrid dev` serves at /demo/pushgrid.js, embedded at build time).
// `--check` fails when the committed bundle differs from a fresh build.
import { build } from "esbuild";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(root, "dist", "pushgrid.js");
const result = await build({
  entryPoints: [join(root, "src", "index.ts")],
  bundle: true,
  format: "iife",
  globalName: "pushgrid",
  target: "es2020",
  platform: "browser",
  legalComments: "none",
  minify: true,
  keepNames: true,
  write: false,
  banner: { js: "// @pushgrid/web browser bundle, built by `npm run build` in sdk/web (do not edit)." },
});
const text = result.outputFiles[0].text;
if (process.argv.includes("--check")) {
  let committed = "";
  try {
    committed = readFileSync(out, "utf8");
  } catch {}
  if (committed !== text) {
    console.error(`${out} is stale: run \`npm run build\` in sdk/web and commit it`);
    process.exit(1);
  }
} else {
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, text);
}
