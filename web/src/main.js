// The medseg workbench page: NiiVue shows the image and the label map; every prompt and edit goes to the server
// (medseg serve), which holds the session's label map. Coordinates sent are voxel indices (x column, y row,
// z = array axis 0), boxes in pixel edges.
import { DRAG_MODE, Niivue } from "@niivue/niivue";
import { ApiError, decodeLabels, getBytes, getJSON, linkTo, npyBytes, send, sendBytes } from "./api.js";
import { fracOfVoxel, fromBitmap, nativeSliceView, toBitmap, voxelOfFrac } from "./geometry.js";

// ITK-SNAP's first label colours: what annotators of this field are used to.
const PALETTE = [
  [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255], [255, 239, 213],
  [0, 0, 205], [205, 133, 63], [210, 180, 140], [102, 205, 170], [0, 0, 128], [0, 139, 139], [46, 139, 87],
];
/** ITK-SNAP's colours for the first labels, then hues a golden angle apart (no two labels alike). */
function labelColour(value) {
  if (value <= PALETTE.length) return PALETTE[value - 1];
  const hue = (value * 137.508) % 360;
  const f = (n) => {
    const k = (n + hue / 30) % 12;
    return Math.round(255 * (0.55 - 0.45 * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

const WINDOWS = {
  auto: null, // NiiVue's robust range
  "CT soft tissue": [400, 40],
  "CT lung": [1500, -600],
  "CT bone": [1800, 400],
  "CT brain": [80, 40],
  "full range": "full",
};
const TOOLS = {
  box: { key: "b", title: "Box (drag)" },
  box3d: { key: "d", title: "3D box (drag; slice range [ ])" },
  positive: { key: "p", title: "Positive click" },
  negative: { key: "n", title: "Negative click (or Shift+click)" },
  brush: { key: "r", title: "Brush" },
  eraser: { key: "e", title: "Eraser" },
  navigate: { key: "v", title: "Navigate (crosshair)" },
};
const VIEWS = { axial: 0, coronal: 1, sagittal: 2, multiplanar: 3 };

const $ = (id) => document.getElementById(id);
const state = {
  images: [], labels: {}, imageId: null, meta: null, session: null, shape: null, tool: "box", label: 1,
  redo: [], busy: false, pointer: null, lastSeconds: null, dirty: false, broken: new Map(), updates: 0,
};

const nv = new Niivue({
  backColor: [0.08, 0.08, 0.1, 1], crosshairColor: [1, 1, 0, 0.5], crosshairWidth: 0.25,
  isRadiologicalConvention: true, // patient left on screen right, as clinical viewers; photos unmirrored
  show3Dcrosshair: false, isColorbar: false, dragAndDropEnabled: false, logLevel: "error",
  // NiiVue's own hotkeys would change the view or the clip plane behind the page's back
  viewModeHotKey: "", clipPlaneHotKey: "", cycleClipPlaneHotKey: "",
});

// ---- status line -------------------------------------------------------------------------------------------
function say(text, kind = "info") {
  const line = $("status");
  line.textContent = text;
  line.dataset.kind = kind;
}

function failed(error) {
  console.error(error);
  say(error instanceof ApiError ? error.message : `error: ${error.message || error}`, "error");
}

async function busy(what, work) {
  if (state.busy) {
    say(`wait: the last action is still running (${what} not done)`, "error");
    return undefined;
  }
  state.busy = true;
  document.body.classList.add("busy");
  say(`${what}…`);
  try {
    return await work();
  } catch (error) {
    failed(error);
    return undefined;
  } finally {
    state.busy = false;
    document.body.classList.remove("busy");
  }
}

// ---- the image list, the task, the flywheel ----------------------------------------------------------------
async function refreshImages() {
  state.images = await getJSON("/api/images");
  const list = $("images");
  list.replaceChildren(
    ...state.images.map((item) => {
      const li = document.createElement("li");
      li.dataset.id = item.id;
      li.dataset.status = item.status;
      li.className = item.id === state.imageId ? "current" : "";
      li.innerHTML = `<span class="name"></span><span class="badge"></span>`;
      li.querySelector(".name").textContent = item.id;
      li.title = `${item.id} (${item.status})`;
      li.querySelector(".badge").textContent = item.status;
      if (state.broken.has(item.id)) {
        li.dataset.status = "error";
        li.title = state.broken.get(item.id);
        li.querySelector(".badge").textContent = "error";
      }
      li.addEventListener("click", () => openImage(item.id));
      return li;
    }),
  );
  const done = state.images.filter((i) => i.status === "done").length;
  $("progress").textContent = `${done} / ${state.images.length} done`;
}

async function loadTask() {
  const task = (await getJSON("/api/task")).labels;
  state.labels = Object.fromEntries(Object.entries(task).filter(([, value]) => value > 0));
  const values = Object.values(state.labels);
  state.label = values.length ? values[0] : 1;
  const R = [0], G = [0], B = [0], A = [0], I = [0], names = ["background"];
  const select = $("label");
  select.replaceChildren();
  for (const [name, value] of Object.entries(state.labels)) {
    const [r, g, b] = labelColour(value);
    R.push(r); G.push(g); B.push(b); A.push(255); I.push(value); names.push(name);
    const option = document.createElement("option");
    option.value = String(value);
    option.textContent = `${value}: ${name}`;
    option.style.color = `rgb(${r},${g},${b})`;
    select.append(option);
  }
  nv.setDrawColormap({ R, G, B, A, I, labels: names });
}

async function refreshFlywheel() {
  try {
    const f = await getJSON("/api/flywheel");
    const t = f.training;
    const dice = (v) => (v === null || v === undefined ? "–" : v.toFixed(3));
    $("flywheel").innerHTML = "";
    const rows = [
      ["images done", `${f.done} / ${f.images}`],
      ["drafter", f.drafter || "none yet (finish an image)"],
      ["specialist", `${t.state}${t.run ? ` (${t.run})` : ""}`],
      ["epochs", t.state === "idle" ? "–" : String(t.epochs_done)],
      ["Dice specialist / in-context", `${dice(t.specialist_dice)} / ${dice(t.incontext_dice)}`],
      ["trains after", f.train_after > 0 ? `${f.train_after} images` : "never (--train-after 0)"],
    ];
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v;
      $("flywheel").append(dt, dd);
    }
    if (t.message) $("flywheel").append(Object.assign(document.createElement("dd"), { textContent: t.message }));
  } catch {
    // the next poll tries again
  }
}

// ---- opening an image --------------------------------------------------------------------------------------
async function openImage(imageId) {
  if (state.busy) return say("wait: the last action is still running", "error");
  if (state.dirty && imageId !== state.imageId && !window.confirm(`Leave ${state.imageId}? Its edits are not saved.`)) {
    return undefined;
  }
  const known = state.images.find((i) => i.id === imageId);
  const drafting = $("use-draft").checked && known && known.status === "todo";
  const what = drafting ? `opening ${imageId} (making its draft: seconds for an image, minutes for a volume)` : `opening ${imageId}`;
  return busy(what, async () => {
    // Everything the new image needs first: an image that cannot be opened leaves the current one as it was.
    let meta, buffer, session;
    try {
      meta = await getJSON(`/api/images/${encodeURIComponent(imageId)}/meta`);
      ({ buffer } = await getBytes(`/api/images/${encodeURIComponent(imageId)}?display=true`));
      session = await send("POST", "/api/sessions", { image_id: imageId, use_draft: $("use-draft").checked });
    } catch (error) {
      if (error instanceof ApiError) markBroken(imageId, error.message);
      throw error;
    }
    if (state.session) send("DELETE", `/api/sessions/${state.session.session_id}`).catch(() => {});
    state.session = null;
    state.dirty = false;
    const url = URL.createObjectURL(new Blob([buffer]));
    try {
      await nv.loadVolumes([{ url, name: `${imageId}.nii.gz` }]);
    } finally {
      URL.revokeObjectURL(url);
    }
    state.imageId = imageId;
    state.meta = meta;
    state.redo = [];
    $("z-from").value = "";
    $("z-to").value = "";
    state.session = session;
    state.shape = session.shape;
    nv.createEmptyDrawing();
    await showMask(await getJSON(`/api/sessions/${session.session_id}/labels`));
    $("window").value = /^CT$/i.test(meta.modality || "") ? "CT soft tissue" : "auto";
    applyWindow();
    setView(meta.ndim === 3 ? "default" : "axial");
    document.body.dataset.ndim = String(meta.ndim);
    showStatus(meta.status, meta.writes_dicom_seg);
    $("image-name").textContent = imageId;
    $("image-info").textContent = `${[...meta.shape].reverse().join(" × ")} voxels, spacing ${meta.spacing
      .map((s) => s.toPrecision(3))
      .join(" × ")} mm`;
    const start = { label: "finished label map", draft: `draft by ${session.draft_engine}`, empty: "empty" };
    $("draft").textContent = start[session.start] + (session.draft_error ? ` (no draft: ${session.draft_error})` : "");
    $("draft").dataset.start = session.start;
    state.startText = $("draft").textContent;
    $("location").textContent = "";
    if (!TOOLS[state.tool] || (state.tool === "box3d" && meta.ndim !== 3)) setTool("box");
    await refreshImages();
    say(`${imageId}: ${start[session.start]}`);
  });
}

async function showMask(mask) {
  const labels = await decodeLabels(mask);
  state.mask = labels;
  nv.drawBitmap = toBitmap(labels, nv.back.permRAS, nv.back.hdr.dims);
  nv.refreshDrawing(true);
  nv.drawScene();
  $("interactions").textContent = String(mask.interactions);
  state.updates += 1; // label maps shown: what the browser tests and the page benchmark wait on
  document.body.dataset.updates = String(state.updates);
}

function edited() {
  $("draft").textContent = `${state.startText}, edited`;
  state.dirty = true;
}

/** An image that could not be opened: marked in the list with its reason, skipped by "save and next". */
function markBroken(imageId, reason) {
  state.broken.set(imageId, reason);
  const item = document.querySelector(`#images li[data-id="${CSS.escape(imageId)}"]`);
  if (item) {
    item.dataset.status = "error";
    item.title = reason;
    item.querySelector(".badge").textContent = "error";
  }
}

// ---- prompts and edits -------------------------------------------------------------------------------------
function sessionPath(suffix) {
  return `/api/sessions/${state.session.session_id}${suffix}`;
}

async function prompt(body, what) {
  if (!state.session) return say("open an image first", "error");
  const t0 = performance.now();
  const done = await busy(what, async () => {
    const before = state.mask;
    await showMask(await send("POST", sessionPath("/prompts"), body));
    if (body.type !== "undo") state.redo = [];
    else if (before) state.redo.push(before);
    edited();
    return true;
  });
  if (done) {
    state.lastSeconds = (performance.now() - t0) / 1000;
    say(`${what}: ${state.lastSeconds.toFixed(2)} s`);
  }
}

async function putLabels(labels, what) {
  const bytes = npyBytes(labels, state.shape);
  return busy(what, async () => {
    await showMask(await sendBytes("PUT", sessionPath("/labels?ext=.npy"), bytes));
    say(what);
    return true;
  });
}

function crosshairVoxel() {
  return voxelOfFrac(nv.back, nv.scene.crosshairPos).map(Math.round);
}

function currentSlice() {
  if (state.meta.ndim !== 3) return null;
  return Math.max(0, Math.min(state.shape[0] - 1, crosshairVoxel()[2]));
}

/** The tile (a 2D view) under canvas point `at` (device pixels), or null (margins, the 3D rendering). */
function tileAt(at) {
  return (nv.screenSlices || []).find((tile) => {
    const [l, t, w, h] = tile.leftTopWidthHeight;
    return tile.axCorSag <= 2 && at[0] >= l && at[0] <= l + w && at[1] >= t && at[1] <= t + h;
  }) || null;
}

/** A pointer event's position on the canvas, in the device pixels NiiVue's tiles are measured in. */
function canvasPoint(event) {
  const rect = $("viewer").getBoundingClientRect();
  return [(event.clientX - rect.left) * pixelRatio(), (event.clientY - rect.top) * pixelRatio()];
}

function pixelRatio() {
  return nv.uiData.dpr || window.devicePixelRatio || 1;
}

/** The image's voxel [x, y, z] under a pointer event, clamped into `tile` (for a box) or null off the image. */
function voxelAt(event, tile = null) {
  let at = canvasPoint(event);
  if (tile) {
    const [l, t, w, h] = tile.leftTopWidthHeight;
    at = [Math.min(Math.max(at[0], l + 0.01), l + w - 0.01), Math.min(Math.max(at[1], t + 0.01), t + h - 0.01)];
  } else if (!tileAt(at)) return null;
  const frac = nv.canvasPos2frac(at);
  if (!frac || frac[0] < 0) return null;
  const voxel = voxelOfFrac(nv.back, frac);
  const inside = voxel.every((v, k) => v > -0.5 && v < nv.back.hdr.dims[k + 1] - 0.5);
  return inside || tile ? voxel.map((v, k) => Math.min(Math.max(v, -0.5), nv.back.hdr.dims[k + 1] - 0.5)) : null;
}

function onBox(down, up) {
  if (!state.session || !["box", "box3d"].includes(state.tool)) return undefined;
  const tile = tileAt(canvasPoint(down)) || tileAt(canvasPoint(up));
  if (!tile) return say("draw boxes on the image", "error");
  const a = voxelAt(down, tile); // a corner off the image is clipped to it
  const b = voxelAt(up, tile);
  if (!a || !b) return say("draw boxes on the image", "error");
  const ndim = state.meta.ndim;
  if (ndim === 3 && Math.abs(a[2] - b[2]) > 0.5) {
    const view = ["axial", "coronal", "sagittal"][nativeSliceView(state.meta)];
    return say(`draw boxes on the ${view} view: it shows this volume's slices`, "error");
  }
  const [x0, x1] = [Math.min(a[0], b[0]), Math.max(a[0], b[0])].map(Math.round);
  const [y0, y1] = [Math.min(a[1], b[1]), Math.max(a[1], b[1])].map(Math.round);
  const box = [x0, y0, x1 + 1, y1 + 1];
  if (x1 - x0 < 1 && y1 - y0 < 1) return undefined; // a click, not a box
  const z = Math.round(a[2]);
  if (state.tool === "box3d") {
    if (ndim !== 3) return say("a 3D box is for volumes", "error");
    const typed = [$("z-from").value, $("z-to").value].map((v) => (v.trim() === "" ? null : Number(v)));
    if (typed.some((v) => v !== null && !Number.isInteger(v))) return say("the 3D box's slices are whole numbers", "error");
    const last = state.shape[0] - 1;
    const [from, to] = typed.map((v) => (v === null ? z : Math.max(0, Math.min(last, v))));
    const [z0, z1] = [Math.min(from, to), Math.max(from, to)];
    return prompt({ type: "box3d", label: state.label, box: [box[0], box[1], z0, box[2], box[3], z1] },
      `3D box on slices ${z0}–${z1}`);
  }
  return prompt({ type: "box", label: state.label, box, z: ndim === 3 ? z : null }, "box");
}

/** The box being dragged, drawn over the canvas (NiiVue's drag callback draws nothing). */
function rubberBand(event) {
  const band = $("rubber");
  if (!state.pointer || !["box", "box3d"].includes(state.tool)) return;
  const area = $("viewer").getBoundingClientRect();
  const [x0, x1] = [state.pointer.clientX, event.clientX].sort((a, b) => a - b);
  const [y0, y1] = [state.pointer.clientY, event.clientY].sort((a, b) => a - b);
  Object.assign(band.style, { left: `${x0 - area.left}px`, top: `${y0 - area.top}px`, width: `${x1 - x0}px`, height: `${y1 - y0}px` });
  band.hidden = false;
}

function onPointerUp(start, event) {
  if (!start || !state.session || event.button !== 0) return;
  const moved = Math.hypot(event.clientX - start.clientX, event.clientY - start.clientY) > 4;
  if (moved) {
    if (["box", "box3d"].includes(state.tool)) onBox(start, event);
    return;
  }
  if (!["positive", "negative", "box"].includes(state.tool)) return;
  if (state.tool === "box" && !event.shiftKey && !event.altKey) return; // plain clicks in box mode move the crosshair
  const v = voxelAt(event);
  if (!v) {
    say("clicks go on the image", "error");
    return;
  }
  const positive = state.tool === "positive" ? !event.shiftKey : state.tool === "box" ? event.altKey : false;
  const z = state.meta.ndim === 3 ? Math.round(v[2]) : null;
  prompt({ type: "click", label: state.label, x: v[0], y: v[1], positive, z },
    `${positive ? "positive" : "negative"} click`);
}

async function onDrawingDone() {
  if (!["brush", "eraser"].includes(state.tool) || !state.session || !nv.drawBitmap) return;
  const labels = fromBitmap(nv.drawBitmap, nv.back.permRAS, nv.back.hdr.dims);
  if (state.mask && labels.every((v, i) => v === state.mask[i])) return; // a click that drew nothing
  if (await putLabels(labels, state.tool === "brush" ? "brush stroke" : "eraser stroke")) {
    state.redo = [];
    edited();
  }
}

async function undo() {
  if (!state.session) return;
  await prompt({ type: "undo" }, "undo");
}

async function redo() {
  const labels = state.redo.pop();
  if (!labels) return say("nothing to redo");
  if (await putLabels(labels, "redo")) edited();
  else state.redo.push(labels); // not done: still to redo
  return undefined;
}

async function save(next) {
  if (!state.session) return;
  const saved = await busy("saving", () => send("POST", sessionPath("/save")));
  if (!saved) return;
  await refreshImages();
  refreshFlywheel();
  const seg = saved.dicom_seg ? ` and ${saved.dicom_seg}` : "";
  say(`saved ${saved.path}${seg}${saved.training === "running" ? "; the specialist trains" : ""}`);
  showStatus("done", Boolean(saved.dicom_seg));
  state.dirty = false;
  $("draft").textContent = state.startText = "finished label map";
  document.body.dataset.saved = saved.path;
  if (next) {
    const order = state.images.map((i) => i.id);
    const after = order.slice(order.indexOf(state.imageId) + 1).concat(order);
    const todo = after.find((id) => state.images.find((i) => i.id === id).status !== "done" && !state.broken.has(id));
    if (todo) await openImage(todo);
    else say(`saved ${saved.path}; every image is done`);
  }
}

function showStatus(status, dicom) {
  const id = encodeURIComponent(state.imageId);
  document.body.dataset.status = status;
  document.body.dataset.dicom = dicom ? "yes" : "no";
  $("download-label").href = linkTo(`/api/images/${id}/label`);
  $("download-seg").href = linkTo(`/api/images/${id}/dicom-seg`);
}

// ---- tools, views, windows ---------------------------------------------------------------------------------
function setTool(tool) {
  if (tool === "box3d" && state.meta && state.meta.ndim !== 3) return say("the 3D box is for volumes", "error");
  state.tool = tool;
  for (const button of document.querySelectorAll("[data-tool]")) {
    button.classList.toggle("active", button.dataset.tool === tool);
  }
  const drawing = tool === "brush" || tool === "eraser";
  nv.setDrawingEnabled(drawing);
  if (drawing) nv.setPenValue(tool === "eraser" ? 0 : state.label, false);
  nv.opts.penSize = Number($("pen").value);
  nv.opts.dragModePrimary = tool === "box" || tool === "box3d" ? DRAG_MODE.callbackOnly : DRAG_MODE.crosshair;
  document.body.dataset.tool = tool;
}

function setView(view) {
  if (state.meta && state.meta.ndim !== 3 && view !== "axial" && view !== "default") return; // 2D: one view
  const type = view === "default" ? nativeSliceView(state.meta || { spacing: [1, 1] }) : VIEWS[view];
  nv.setSliceType(type);
  for (const button of document.querySelectorAll("[data-view]")) {
    button.classList.toggle("active", VIEWS[button.dataset.view] === type);
  }
}

function applyWindow() {
  const volume = nv.volumes[0];
  if (!volume) return;
  const preset = WINDOWS[$("window").value];
  if (preset === "full") [volume.cal_min, volume.cal_max] = [volume.global_min, volume.global_max];
  else if (preset) [volume.cal_min, volume.cal_max] = [preset[1] - preset[0] / 2, preset[1] + preset[0] / 2];
  else [volume.cal_min, volume.cal_max] = [volume.robust_min, volume.robust_max];
  nv.updateGLVolume();
}

function setRange(end) {
  const z = currentSlice();
  if (z !== null) $(end === 0 ? "z-from" : "z-to").value = String(z);
}

function stepSlice(step) {
  if (!state.meta || state.meta.ndim !== 3) return;
  const v = crosshairVoxel();
  v[2] = Math.max(0, Math.min(state.shape[0] - 1, v[2] + step));
  showVoxel(v);
}

const SHORTCUTS = {
  ArrowUp: () => stepSlice(1),
  ArrowDown: () => stepSlice(-1),
  PageUp: () => stepSlice(5),
  PageDown: () => stepSlice(-5),
  s: () => save(false),
  Enter: () => save(true),
  "[": () => setRange(0),
  "]": () => setRange(1),
  1: () => setView("axial"),
  2: () => setView("coronal"),
  3: () => setView("sagittal"),
  4: () => setView("multiplanar"),
  w: () => {
    const select = $("window");
    select.selectedIndex = (select.selectedIndex + 1) % select.options.length;
    applyWindow();
  },
  l: () => {
    const select = $("label");
    select.selectedIndex = (select.selectedIndex + 1) % select.options.length;
    select.dispatchEvent(new Event("change"));
  },
  "?": () => $("help").toggleAttribute("open"),
};

function onKey(event) {
  if (event.target.closest("input, select, textarea")) {
    if (event.key === "Escape" || event.key === "Enter") event.target.blur(); // back to the shortcuts
    return;
  }
  const key = event.key;
  if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === "z") {
    event.preventDefault();
    return event.shiftKey ? redo() : undo();
  }
  if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === "y") {
    event.preventDefault();
    return redo();
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return undefined;
  const tool = Object.entries(TOOLS).find(([, t]) => t.key === key.toLowerCase());
  if (tool) return setTool(tool[0]);
  const action = SHORTCUTS[key];
  if (action) {
    event.preventDefault();
    action();
  }
  return undefined;
}

/** Page (CSS pixel) coordinates of voxel [x, y, z] in the view showing it, or null when no tile shows it. */
function screenOf(voxel) {
  const frac = fracOfVoxel(nv.back, voxel);
  const position = nv.frac2canvasPos(frac);
  if (!position) return null;
  const rect = $("viewer").getBoundingClientRect();
  return [rect.left + position[0] / pixelRatio(), rect.top + position[1] / pixelRatio()];
}

/** Move the crosshair (and so the slices shown) to voxel [x, y, z]. */
function showVoxel(voxel) {
  nv.scene.crosshairPos = fracOfVoxel(nv.back, voxel);
  nv.drawScene();
  nv.createOnLocationChange();
}

// ---- wiring ------------------------------------------------------------------------------------------------
function buildControls() {
  const tools = $("tools");
  for (const [name, tool] of Object.entries(TOOLS)) {
    const button = document.createElement("button");
    button.dataset.tool = name;
    button.title = `${tool.title} [${tool.key.toUpperCase()}]`;
    button.textContent = `${tool.title.split(" (")[0]} (${tool.key.toUpperCase()})`;
    button.addEventListener("click", () => setTool(name));
    tools.append(button);
  }
  for (const name of Object.keys(WINDOWS)) {
    $("window").append(Object.assign(document.createElement("option"), { value: name, textContent: name }));
  }
  $("window").addEventListener("change", applyWindow);
  for (const button of document.querySelectorAll("[data-view]")) {
    button.addEventListener("click", () => setView(button.dataset.view));
  }
  $("label").addEventListener("change", () => {
    state.label = Number($("label").value);
    setTool(state.tool);
  });
  $("pen").addEventListener("input", () => (nv.opts.penSize = Number($("pen").value)));
  $("opacity").addEventListener("input", () => nv.setDrawOpacity(Number($("opacity").value) / 100));
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("save").addEventListener("click", () => save(false));
  $("next").addEventListener("click", () => save(true));
  const help = $("shortcuts");
  const lines = Object.values(TOOLS).map((t) => `${t.key.toUpperCase()}: ${t.title}`);
  lines.push("Ctrl+Z / Ctrl+Y: undo / redo", "S: save, Enter: save and next", "1–4: axial, coronal, sagittal, multiplanar");
  lines.push("Arrow up / down, Page up / down: next / previous slice (by 1 / 5)");
  lines.push("W: next window preset, L: next label", "[ ]: 3D box slice range from / to the current slice");
  lines.push("Shift+click: negative click; in box mode Alt+click / Shift+click: positive / negative click");
  help.replaceChildren(...lines.map((text) => Object.assign(document.createElement("li"), { textContent: text })));
}

async function main() {
  buildControls();
  await nv.attachToCanvas($("viewer"));
  nv.onLocationChange = (location) => {
    if (!state.meta) return;
    const v = voxelOfFrac(nv.back, location.frac).map(Math.round);
    const where = state.meta.ndim === 3 ? `x ${v[0]}, y ${v[1]}, slice ${v[2]} (of 0–${state.shape[0] - 1})` : `x ${v[0]}, y ${v[1]}`;
    const value = location.values && location.values[0] ? location.values[0].value : null;
    const shown = typeof value === "number" ? ` = ${Number(value.toPrecision(5))}` : "";
    $("location").textContent = `${where}${shown}`;
  };
  nv.onMouseUp = () => setTimeout(onDrawingDone, 0);
  nv.setDrawOpacity(0.5);
  const canvas = $("viewer");
  canvas.addEventListener("pointerdown", (e) => {
    state.pointer = e; // the press, until its release
    if (e.button === 0 && ["box", "box3d"].includes(state.tool)) rubberBand(e);
  });
  canvas.addEventListener("pointermove", (e) => state.pointer && rubberBand(e));
  // Capture phase: seen before NiiVue's handlers (which may stop it), and wherever the button is released
  // (a box may end off the canvas); a press elsewhere forgets a press on the canvas whose release was missed.
  // The press is taken now, the release handled after NiiVue's handlers: a press that comes before the deferred
  // handler runs (a click on a tool, then a drag, on a busy machine) must not be paired with the earlier release.
  window.addEventListener("pointerup", (e) => {
    $("rubber").hidden = true;
    const start = state.pointer;
    state.pointer = null;
    setTimeout(() => onPointerUp(start, e), 0);
  }, true);
  window.addEventListener("pointerdown", (e) => e.target !== canvas && (state.pointer = null), true);
  // Capture: our shortcuts run first, and NiiVue's canvas listeners (view modes, h/j/k/l crosshair moves) never
  // see a key, so the page's state and the viewer's cannot drift apart.
  window.addEventListener("keydown", (event) => {
    if (event.target === canvas) event.stopPropagation();
    onKey(event);
  }, true);
  window.addEventListener("keyup", (event) => event.target === canvas && event.stopPropagation(), true);
  setTool("box");
  try {
    await loadTask();
    await refreshImages();
    refreshFlywheel();
    setInterval(refreshFlywheel, 3000);
    if (state.images.length === 0) say("the workspace holds no images yet: add some and reload");
    else {
      const first = state.images.find((i) => i.status !== "done") || state.images[0];
      await openImage(first.id);
    }
  } catch (error) {
    failed(error);
  }
  window.medseg = { state, nv, screenOf, showVoxel }; // for the browser tests and the curious
  document.body.dataset.ready = "yes";
}

main();
