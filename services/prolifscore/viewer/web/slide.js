// Slide page: OpenSeadragon over the server's DeepZoom tiles, and one canvas on top that draws
// the result's layers (tumor probability per tile, kept tiles, mitoses, densest 10-HPF region)
// in image (level-0) coordinates, redrawn whenever the view moves.
"use strict";

const MITOSIS_RGB = [255, 0, 255];
const TILE_RGB = [0, 170, 80];
const REGION_RGB = [0, 200, 255];
const state = { overlays: null, item: null, selected: null, tilesLoaded: false };

// Blue (0) -> yellow (0.5) -> red (1): the heatmap PNG's scale (scoring/heatmap.py).
function colour(p) {
  p = Math.min(1, Math.max(0, p));
  if (p < 0.5) {
    const t = p / 0.5;
    return [Math.round(255 * t), Math.round(255 * t), Math.round(255 * (1 - t))];
  }
  const t = (p - 0.5) / 0.5;
  return [255, Math.round(255 * (1 - t)), 0];
}

function rgba(rgb, alpha) {
  return `rgba(${rgb[0]},${rgb[1]},${rgb[2]},${alpha})`;
}

function el(tag, text, parent) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function layer(name) {
  return {
    on: document.getElementById(`layer-${name}`).checked,
    alpha: Number(document.getElementById(`opacity-${name}`).value),
  };
}

// Image (level-0) pixels -> canvas pixels, from the current (animated) view.
function transform() {
  const vp = state.viewer.viewport;
  const origin = vp.pixelFromPoint(state.item.imageToViewportCoordinates(0, 0, true), true);
  const far = vp.pixelFromPoint(state.item.imageToViewportCoordinates(10000, 0, true), true);
  return { x0: origin.x, y0: origin.y, scale: (far.x - origin.x) / 10000 };
}

function draw() {
  const canvas = state.canvas;
  const box = state.viewer.container;
  const ratio = window.devicePixelRatio || 1;
  const width = box.clientWidth;
  const height = box.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const o = state.overlays;
  if (!o || !state.item) return;
  const t = transform();
  const sx = (x) => t.x0 + x * t.scale;
  const sy = (y) => t.y0 + y * t.scale;
  const side = o.tile_side * t.scale;
  const visible = (x, y, w, h) => sx(x) + w >= 0 && sy(y) + h >= 0 && sx(x) <= width && sy(y) <= height;
  const heat = layer("heatmap");
  const cls = Number(document.getElementById("heatmap-class").value);
  const tiles = layer("tiles");
  for (const tile of o.tiles) {
    const [x, y] = tile;
    if (!visible(x, y, side, side)) continue;
    if (heat.on && heat.alpha > 0) {
      ctx.fillStyle = rgba(colour(tile[2 + cls]), heat.alpha);
      ctx.fillRect(sx(x), sy(y), side, side);
    }
    if (tiles.on && tiles.alpha > 0 && side >= 3) {
      ctx.strokeStyle = rgba(TILE_RGB, tiles.alpha);
      ctx.lineWidth = 1;
      ctx.strokeRect(sx(x) + 0.5, sy(y) + 0.5, Math.max(1, side - 1), Math.max(1, side - 1));
    }
  }
  if (state.selected) {
    ctx.strokeStyle = "rgba(255,255,255,0.95)";
    ctx.lineWidth = 3;
    ctx.strokeRect(sx(state.selected[0]), sy(state.selected[1]), side, side);
  }
  drawRegion(ctx, o.region, sx, sy, t.scale);
  drawMitoses(ctx, o.mitoses, sx, sy, t.scale, visible);
}

function drawRegion(ctx, region, sx, sy, scale) {
  const r = layer("region");
  if (!region || !r.on || r.alpha <= 0) return;
  ctx.save();
  ctx.strokeStyle = rgba(REGION_RGB, r.alpha);
  ctx.lineWidth = 3;
  ctx.setLineDash([10, 6]);
  ctx.strokeRect(sx(region.x), sy(region.y), region.width * scale, region.height * scale);
  ctx.setLineDash([]);
  ctx.fillStyle = rgba(REGION_RGB, r.alpha);
  ctx.font = "bold 13px system-ui, sans-serif";
  ctx.fillText(`densest 10 HPF: ${region.mitoses_per_10hpf}`, sx(region.x) + 4, sy(region.y) - 6);
  ctx.restore();
}

function drawMitoses(ctx, mitoses, sx, sy, scale, visible) {
  const m = layer("mitoses");
  if (!m.on || m.alpha <= 0) return;
  const radius = Math.max(6, 10 * scale);
  const labels = scale >= 0.2;
  ctx.lineWidth = 1.5;
  ctx.font = "12px system-ui, sans-serif";
  for (const [x, y, p] of mitoses) {
    if (!visible(x - radius / scale, y - radius / scale, 2 * radius, 2 * radius)) continue;
    ctx.beginPath();
    ctx.arc(sx(x), sy(y), radius, 0, 2 * Math.PI);
    ctx.fillStyle = rgba(MITOSIS_RGB, 0.85 * m.alpha);
    ctx.fill();
    ctx.strokeStyle = rgba([0, 0, 0], m.alpha);
    ctx.stroke();
    if (labels) {
      ctx.fillStyle = rgba([0, 0, 0], m.alpha);
      ctx.fillText(p.toFixed(2), sx(x) + radius + 2, sy(y) + 4);
    }
  }
}

function showTile(tile) {
  const box = document.getElementById("tile-info");
  box.replaceChildren();
  el("h2", "Tile", box);
  if (!tile) {
    el("p", "No scored tile here.", box);
    return;
  }
  const dl = el("dl", undefined, box);
  el("dt", "Position", dl);
  el("dd", `x ${tile[0]}, y ${tile[1]} (level 0)`, dl);
  const classes = state.overlays.classes;
  for (let k = 0; k < classes; k++) {
    el("dt", `P(tumor score ${k + 1})`, dl);
    el("dd", tile[2 + k].toFixed(4), dl);
  }
  el("dt", "Mitosis max", dl);
  el("dd", tile[2 + classes].toFixed(3), dl);
  el("dt", "Mitoses", dl);
  el("dd", String(tile[3 + classes]), dl);
}

function onClick(event) {
  if (!event.quick || !state.overlays || !state.item) return;
  const p = state.item.viewerElementToImageCoordinates(event.position);
  const side = state.overlays.tile_side;
  const hit = state.overlays.tiles.find(
    (t) => p.x >= t[0] && p.x < t[0] + side && p.y >= t[1] && p.y < t[1] + side,
  );
  state.selected = hit || null;
  showTile(hit);
  draw();
}

function showResult(info) {
  document.title = `${info.slide_id} · ProlifScore`;
  document.getElementById("title").textContent = info.slide_id;
  const box = document.getElementById("result");
  const r = info.result;
  const downloads = document.getElementById("downloads");
  for (const [label, href] of [
    ["GeoJSON (QuPath)", info.downloads.geojson],
    ["Predictions CSV", info.downloads.csv],
    ["Heatmap PNG", info.downloads.heatmap],
  ]) {
    if (!href) continue;
    const a = el("a", label, downloads);
    a.href = href;
    a.setAttribute("download", "");
  }
  if (!r) {
    el("p", "No stored result for this slide: the slide alone.", box);
    return;
  }
  document.getElementById("summary").textContent =
    `tumor score ${r.tumor_score || "none"} · mitotic score ${r.mitotic_score || "–"}`;
  const dl = el("dl", undefined, box);
  const rows = [
    ["Tumor score", r.tumor_score || "none"],
    ["Probabilities", r.probabilities.map((p) => p.toFixed(3)).join(" / ")],
    ["Mitotic score", r.mitotic_score || "–"],
    ["Mitoses", `${r.mitosis_count} (${r.mitoses_per_10hpf} per 10 HPF)`],
    ["Tiles scored", r.tiles_scored],
    ["Models", r.models.map((m) => `${m.name} v${m.version}`).join(", ")],
    ["Request", r.request_id],
    ["Size", `${info.dimensions[0]} × ${info.dimensions[1]} px, ${info.mpp ?? "?"} µm/px`],
  ];
  for (const [k, v] of rows) {
    el("dt", k, dl);
    el("dd", String(v), dl);
  }
  for (const w of r.warnings) el("p", `⚠ ${w}`, box).className = "warning";
}

function setupControls(overlays) {
  const select = document.getElementById("heatmap-class");
  for (let k = 0; k < overlays.classes; k++) {
    const option = el("option", `P(tumor score ${k + 1})`, select);
    option.value = String(k);
  }
  select.value = String(Math.max(0, (overlays.predicted || 1) - 1));
  for (const input of document.querySelectorAll("#layers input, #layers select")) {
    input.addEventListener("input", draw);
  }
  if (overlays.tiles.length === 0) {
    el("p", "This result has no per-tile predictions (scored without include_tiles): no " +
      "tile layers.", document.getElementById("layers")).className = "warning";
  }
  if (overlays.region && overlays.region.computed) {
    document.getElementById("region-note").textContent =
      "computed by the viewer from the mitoses (the result does not record it)";
  }
}

function markReady() {
  if (state.tilesLoaded && (state.overlays || state.noResult)) document.body.dataset.ready = "1";
}

async function main() {
  const name = decodeURIComponent(location.pathname.slice("/slide/".length));
  const quoted = name.split("/").map(encodeURIComponent).join("/");
  const response = await fetch(`/api/slide/${quoted}${location.search}`);
  if (!response.ok) {
    document.getElementById("title").textContent = `Cannot open ${name} (${response.status})`;
    return;
  }
  const info = await response.json();
  showResult(info);
  const viewer = OpenSeadragon({
    element: document.getElementById("viewer"),
    prefixUrl: "/vendor/openseadragon/images/",
    tileSources: info.dzi,
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_LEFT",
    maxZoomPixelRatio: 2,
    visibilityRatio: 0.5,
    gestureSettingsMouse: { clickToZoom: false },
    crossOriginPolicy: false,
  });
  state.viewer = viewer;
  const canvas = el("canvas");
  canvas.id = "overlay";
  viewer.canvas.appendChild(canvas);
  state.canvas = canvas;
  viewer.addHandler("open", () => {
    state.item = viewer.world.getItemAt(0);
    state.item.addHandler("fully-loaded-change", (e) => {
      if (e.fullyLoaded) {
        state.tilesLoaded = true;
        markReady();
      }
    });
    draw();
  });
  for (const event of ["animation", "update-viewport", "resize", "viewport-change"]) {
    viewer.addHandler(event, draw);
  }
  viewer.addHandler("canvas-click", onClick);
  window.prolif = { viewer, state, draw };
  if (!info.overlays) {
    state.noResult = true;
    markReady();
    return;
  }
  const overlays = await (await fetch(info.overlays)).json();
  state.overlays = overlays;
  setupControls(overlays);
  draw();
  markReady();
}

main();
