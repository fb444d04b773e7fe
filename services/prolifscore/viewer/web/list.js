// Slide list: every slide under the roots with its latest stored result (DOM built with
// textContent only: slide ids and warnings are data, never markup).
"use strict";

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fmt(p) {
  return p.map((v) => v.toFixed(3)).join(" / ");
}

function resultCells(row, r) {
  if (!r) {
    cell(row, "not scored");
    for (let i = 0; i < 6; i++) cell(row, "");
    return;
  }
  cell(row, r.tumor_score ? String(r.tumor_score) : "none", "score");
  cell(row, fmt(r.probabilities));
  cell(row, r.mitotic_score ? String(r.mitotic_score) : "–", "score");
  cell(row, `${r.mitosis_count} (${r.mitoses_per_10hpf} / 10 HPF)`);
  cell(row, String(r.tiles_scored));
  cell(row, r.models.map((m) => `${m.name} v${m.version}`).join(", "));
  cell(row, r.warnings.join("; "), "warn");
}

async function main() {
  const status = document.getElementById("status");
  const response = await fetch("/api/slides");
  if (!response.ok) {
    status.textContent = `Cannot list slides (${response.status})`;
    return;
  }
  const data = await response.json();
  const body = document.querySelector("#slides tbody");
  for (const s of data.slides) {
    const row = document.createElement("tr");
    const name = cell(row, "");
    const link = document.createElement("a");
    link.href = s.url;
    link.textContent = s.name;
    name.appendChild(link);
    resultCells(row, s.result);
    body.appendChild(row);
  }
  document.getElementById("slides").hidden = data.slides.length === 0;
  status.textContent = data.slides.length
    ? `${data.slides.length} slides`
    : "No slide under the slide roots (PROLIF_SLIDE_ROOTS).";
  const orphans = document.getElementById("orphans");
  for (const o of data.results_without_slide) {
    const li = document.createElement("li");
    li.textContent = `${o.slide_id}: tumor score ${o.result.tumor_score}, ` +
      `mitotic score ${o.result.mitotic_score}`;
    orphans.querySelector("ul").appendChild(li);
  }
  orphans.hidden = data.results_without_slide.length === 0;
}

main();
