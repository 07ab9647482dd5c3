// The playground: the REST API of the server that serves this page, nothing from elsewhere.
"use strict";

const playground = (() => {
  const $ = (id) => document.getElementById(id);
  const SIDE = 28; // MNIST's images: 28 x 28, the digit within a 20 x 20 box
  const GRID = 32; // density grid: 32 x 32 = 1024 points, the default max_items_per_request
  const EXTENT = 4; // the plane shown: [-4, 4] x [-4, 4]

  function status(message, isError = false) {
    $("status").textContent = message;
    $("status").className = isError ? "error" : "";
  }

  async function api(method, path, body) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const token = $("token").value.trim();
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await response.text();
    const answer = text ? JSON.parse(text) : {};
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    return answer;
  }

  function outputs(answer) {
    const named = {};
    for (const output of answer.outputs) named[output.name] = output.data;
    return named;
  }

  async function infer(model, inputs, tol) {
    const started = performance.now();
    const answer = await api("POST", `/v2/models/${encodeURIComponent(model)}/infer`, { inputs, parameters: { tol } });
    return { answer, named: outputs(answer), ms: performance.now() - started };
  }

  // ---- models -------------------------------------------------------------------------------
  async function loadModels() {
    const index = await api("POST", "/v2/repository/index", {});
    const byTask = { classify: [], density: [] };
    for (const entry of index) {
      const metadata = await api("GET", `/v2/models/${encodeURIComponent(entry.name)}`);
      const task = metadata.properties ? metadata.properties.task : "";
      if (task in byTask) byTask[task].push(entry.name);
    }
    for (const [select, names] of [[$("classifier"), byTask.classify], [$("density-model"), byTask.density]]) {
      select.replaceChildren(...names.map((name) => new Option(name, name)));
    }
    status(`${index.length} models served`);
  }

  // ---- drawing ------------------------------------------------------------------------------
  const pad = $("pad");
  const ink = pad.getContext("2d", { willReadFrequently: true });

  function clear() {
    ink.fillStyle = "#000";
    ink.fillRect(0, 0, pad.width, pad.height);
  }

  function position(event) {
    const box = pad.getBoundingClientRect();
    return [(event.clientX - box.left) * (pad.width / box.width), (event.clientY - box.top) * (pad.height / box.height)];
  }

  let last = null;
  pad.addEventListener("pointerdown", (event) => {
    pad.setPointerCapture(event.pointerId);
    last = position(event);
  });
  pad.addEventListener("pointermove", (event) => {
    if (!last) return;
    const next = position(event);
    ink.strokeStyle = "#fff";
    ink.lineWidth = 20;
    ink.lineCap = "round";
    ink.beginPath();
    ink.moveTo(...last);
    ink.lineTo(...next);
    ink.stroke();
    last = next;
  });
  pad.addEventListener("pointerup", () => {
    last = null;
  });

  /** Show a 28 x 28 digit (784 values 0..255, row-major) on the pad, as if drawn. */
  function drawDigit(pixels) {
    const small = document.createElement("canvas");
    small.width = small.height = SIDE;
    const image = small.getContext("2d").createImageData(SIDE, SIDE);
    pixels.forEach((value, index) => {
      image.data.set([value, value, value, 255], 4 * index);
    });
    small.getContext("2d").putImageData(image, 0, 0);
    clear();
    ink.imageSmoothingEnabled = true;
    ink.drawImage(small, 0, 0, pad.width, pad.height);
  }

  /** The pad as MNIST prepares its digits: the ink's bounding box scaled into 20 x 20, centred
   * in 28 x 28, grayscale 0..255. Null when nothing is drawn. */
  function digitPixels() {
    const { data } = ink.getImageData(0, 0, pad.width, pad.height);
    let [left, top, right, bottom] = [pad.width, pad.height, -1, -1];
    for (let y = 0; y < pad.height; y++) {
      for (let x = 0; x < pad.width; x++) {
        if (data[4 * (y * pad.width + x)] > 16) {
          left = Math.min(left, x);
          right = Math.max(right, x);
          top = Math.min(top, y);
          bottom = Math.max(bottom, y);
        }
      }
    }
    if (right < 0) return null;
    const [width, height] = [right - left + 1, bottom - top + 1];
    const scale = 20 / Math.max(width, height);
    const small = document.createElement("canvas");
    small.width = small.height = SIDE;
    const context = small.getContext("2d", { willReadFrequently: true });
    context.fillStyle = "#000";
    context.fillRect(0, 0, SIDE, SIDE);
    context.imageSmoothingEnabled = true;
    context.imageSmoothingQuality = "high";
    const [w, h] = [width * scale, height * scale];
    context.drawImage(pad, left, top, width, height, (SIDE - w) / 2, (SIDE - h) / 2, w, h);
    const rgba = context.getImageData(0, 0, SIDE, SIDE).data;
    return Array.from({ length: SIDE * SIDE }, (_, index) => rgba[4 * index]);
  }

  // ---- classify -----------------------------------------------------------------------------
  function tolerances() {
    const values = $("tolerances").value.split(",").map((text) => Number(text.trim()));
    if (!values.length || values.some((value) => !(value > 0))) throw new Error("tolerances: positive numbers, comma-separated");
    return values;
  }

  function bars(probabilities) {
    const top = probabilities.indexOf(Math.max(...probabilities));
    const cell = document.createElement("div");
    cell.className = "bars";
    probabilities.forEach((p, digit) => {
      const bar = document.createElement("span");
      bar.style.height = `${Math.max(2, 100 * p)}%`;
      bar.title = `${digit}: ${(100 * p).toFixed(1)}%`;
      if (digit === top) bar.className = "top";
      cell.append(bar);
    });
    return cell;
  }

  async function classify() {
    const pixels = digitPixels();
    if (!pixels) {
      status("draw a digit first", true);
      return [];
    }
    const model = $("classifier").value;
    const inputs = [{ name: "images", shape: [1, SIDE, SIDE], datatype: "UINT8", data: pixels }];
    const body = $("classify-results").tBodies[0];
    body.replaceChildren();
    status(`classifying at ${tolerances().length} tolerances…`);
    const results = await Promise.all(tolerances().map((tol) => infer(model, inputs, tol).then((r) => ({ tol, ...r }))));
    for (const { tol, named, ms } of results) {
      const row = body.insertRow();
      row.dataset.tol = String(tol);
      row.dataset.label = String(named.labels[0]);
      row.dataset.nfe = String(named.nfe[0]);
      row.insertCell().textContent = String(tol);
      const label = row.insertCell();
      label.className = "label";
      label.textContent = String(named.labels[0]);
      row.insertCell().append(bars(named.probabilities));
      row.insertCell().textContent = String(named.nfe[0]);
      row.insertCell().textContent = `${ms.toFixed(0)} ms`;
    }
    status(`classified with ${model}`);
    return results.map(({ tol, named, ms }) => ({ tol, label: named.labels[0], nfe: named.nfe[0], ms }));
  }

  // ---- density ------------------------------------------------------------------------------
  const plane = $("plane");

  function toCanvas(x, y) {
    return [((x + EXTENT) / (2 * EXTENT)) * plane.width, ((EXTENT - y) / (2 * EXTENT)) * plane.height];
  }

  async function density() {
    const model = $("density-model").value;
    const tol = Number($("density-tol").value);
    const n = Number($("density-n").value);
    status(`sampling ${model}…`);
    const grid = [];
    for (let row = 0; row < GRID; row++) {
      for (let column = 0; column < GRID; column++) {
        const step = (2 * EXTENT) / GRID;
        grid.push(-EXTENT + (column + 0.5) * step, EXTENT - (row + 0.5) * step);
      }
    }
    const [field, drawn] = await Promise.all([
      infer(model, [{ name: "points", shape: [GRID * GRID, 2], datatype: "FP32", data: grid }], tol),
      infer(model, [{ name: "n", shape: [1], datatype: "UINT32", data: [n] }], tol),
    ]);
    const context = plane.getContext("2d");
    const values = field.named.log_density.map(Math.exp);
    const peak = Math.max(...values) || 1;
    const cell = plane.width / GRID;
    values.forEach((value, index) => {
      const shade = Math.round(255 * Math.sqrt(value / peak));
      context.fillStyle = `rgb(${Math.round(shade * 0.3)}, ${Math.round(shade * 0.5)}, ${shade})`;
      context.fillRect((index % GRID) * cell, Math.floor(index / GRID) * cell, cell + 1, cell + 1);
    });
    const points = drawn.named.points;
    context.fillStyle = "#ffd34d";
    for (let index = 0; index < points.length; index += 2) {
      const [x, y] = toCanvas(points[index], points[index + 1]);
      context.fillRect(x - 1.5, y - 1.5, 3, 3);
    }
    const mean = (values_) => values_.reduce((a, b) => a + b, 0) / values_.length;
    const summary = {
      samples: points.length / 2,
      sampleNfe: mean(drawn.named.nfe),
      densityNfe: mean(field.named.nfe),
      ms: Math.max(field.ms, drawn.ms),
    };
    plane.dataset.samples = String(summary.samples);
    $("density-summary").textContent =
      `${summary.samples} samples at tol ${tol}: mean NFE ${summary.sampleNfe.toFixed(1)} sampling, ` +
      `${summary.densityNfe.toFixed(1)} on the density grid; ${summary.ms.toFixed(0)} ms`;
    status(`sampled ${model}`);
    return summary;
  }

  function guarded(action) {
    return () => action().catch((error) => status(error.message, true));
  }

  $("clear").addEventListener("click", clear);
  $("token").addEventListener("change", guarded(loadModels));
  $("run-classify").addEventListener("click", guarded(classify));
  $("run-density").addEventListener("click", guarded(density));
  clear();
  const ready = loadModels().catch((error) => status(error.message, true));
  return { ready, drawDigit, digitPixels, classify, density };
})();

window.playground = playground;
