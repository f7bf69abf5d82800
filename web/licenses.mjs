// Writes the notices of the npm packages bundled into workbench.js (from esbuild's metafile).
import { existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const [metafile, output] = process.argv.slice(2);
const inputs = Object.keys(JSON.parse(readFileSync(metafile, "utf8")).inputs);
const names = new Set();
for (const input of inputs) {
  const match = input.match(/node_modules\/((@[^/]+\/)?[^/]+)/);
  if (match) names.add(match[1]);
}
const parts = ["Third-party software bundled in workbench.js (built by scripts/build_web.sh from web/package-lock.json)\n"];
for (const name of [...names].sort()) {
  const folder = join("node_modules", name);
  const info = JSON.parse(readFileSync(join(folder, "package.json"), "utf8"));
  const file = readdirSync(folder).find((f) => /^(licen[sc]e|copying)/i.test(f));
  const text = file && existsSync(join(folder, file)) ? readFileSync(join(folder, file), "utf8").trim() : "(no license file in the package)";
  parts.push(`${"=".repeat(78)}\n${name} ${info.version} (${info.license || "license not stated"})\n${info.repository?.url || info.homepage || ""}\n\n${text}\n`);
}
writeFileSync(output, parts.join("\n"));
