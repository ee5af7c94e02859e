// deltatune board: plain JavaScript, no build step, no network beyond this board's own API.
// Views (the URL hash): #runs, #run/<name>, #compare/<a>,<b>,..., #play. The current view polls its data
// every second, so curves grow while a run trains. Text from run folders is only ever set as textContent.
"use strict";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const POLL_MS = Number(new URLSearchParams(location.search).get("poll")) || 1000;  // ?poll=ms
let timer = null;
let selected = new Set();
let config = { playground: null };
// The chart settings, kept across polls and page loads: TensorBoard's smoothing weight (0.6 its default) and x axis.
const settings = { smoothing: 0.6, x: "step" };
try { Object.assign(settings, JSON.parse(localStorage.getItem("deltatune-board") || "{}")); } catch (e) { /* none */ }
settings.smoothing = Math.min(0.999, Math.max(0, Number(settings.smoothing) || 0));  // a stored value gone odd
// TensorBoard's x axes (step, relative, wall) and the epoch; relative and wall read each log row's wall_time (seconds
// since 1970, written by the trainer's log since session 48; an older log has none, and its charts say so).
const AXES = ["step", "epoch", "relative", "wall"];
if (!AXES.includes(settings.x)) settings.x = "step";

function el(tag, attrs, ...children) {
  const node = tag === "svg" || ["path", "line", "text", "g", "polyline", "circle"].includes(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick" || k === "onchange" || k === "oninput") node[k] = v; else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

async function getJSON(url, options) {
  const resp = await fetch(url, options);
  const data = await resp.json();
  if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
  return data;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  // A value under 0.001 in four significant digits (a converged loss of 3e-5 was shown as 0.0000)
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : Math.abs(v) < 1e-3 ? v.toExponential(3) : v.toFixed(4);
  return String(v);
}

// TensorBoard's smoothing (its classicSmoothing): an exponential moving average debiased as Adam's moments are, so
// the first points are not pulled towards 0; a constant series and values that are not finite are left as they are.
function smooth(ys, weight) {
  let last = 0, n = 0;
  const constant = ys.every(y => y === ys[0]);
  return ys.map(y => {
    if (constant || !Number.isFinite(y)) return y;
    last = last * weight + (1 - weight) * y;
    n += 1;
    return weight === 1 ? last : last / (1 - Math.pow(weight, n));
  });
}

// -- charts ---------------------------------------------------------------------------------------------
// series: [{label, points: [[x, y], ...]}]; draws lines on shared axes, as SVG.
function chart(title, series, id) {
  const W = 560, H = 260, L = 52, R = 12, T = 22, B = 30;
  const all = series.flatMap(s => s.points);
  const svg = el("svg", { width: W, height: H, class: "chart", id: id || "", "data-points": String(all.length), "data-x": settings.x });
  svg.append(el("text", { x: L, y: 15 }, title));
  if (!all.length) {
    const none = settings.x === "relative" || settings.x === "wall" ? "no log rows with a time (an older log)" : "no points yet";
    svg.append(el("text", { x: W / 2 - 40, y: H / 2 }, none));
    return svg;
  }
  // A loop: spreading 150,000 points into Math.min overflows the call stack.
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of all) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.append(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
  svg.append(el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
  svg.append(el("text", { x: W - R, y: H - B - 4, "text-anchor": "end", class: "axis-name" }, settings.x));
  for (const t of [0, 0.5, 1]) {
    const y = y0 + t * (y1 - y0), x = x0 + t * (x1 - x0);
    svg.append(el("text", { x: 2, y: sy(y) + 4 }, y.toPrecision(3)));
    const anchor = ["start", "middle", "end"][t * 2];  // the last tick's label ends at the axis, inside the chart
    svg.append(el("text", { x: sx(x), y: H - 10, "text-anchor": anchor }, tick(x, x1 - x0)));
  }
  const line = pts => pts.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const color = COLORS[i % COLORS.length];
    const w = settings.smoothing;
    let pts = s.points;
    if (w > 0) {  // every series, as TensorBoard (two points too): the raw curve faint behind the smoothed one
      svg.append(el("polyline", { points: line(s.points), fill: "none", stroke: color, "stroke-opacity": 0.25, "data-raw": s.label }));
      const ys = smooth(s.points.map(p => p[1]), w);
      pts = s.points.map((p, j) => [p[0], ys[j]]);
    }
    svg.append(el("polyline", { points: line(pts), fill: "none", stroke: color, "stroke-width": 2, "data-label": s.label }));
    // A line of one point is invisible: TensorBoard draws it as a dot (radius 4), and draws no dots on longer lines.
    if (pts.length === 1) svg.append(el("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 4, fill: color, "data-dot": s.label }));
  });
  return svg;
}

// An x tick's label: seconds as a duration on the relative axis, a clock time (with the date past a day) on the wall
// axis, else the number.
function tick(x, span) {
  if (settings.x === "relative") {
    const a = Math.abs(x);
    return a < 120 ? `${+x.toFixed(1)} s` : a < 7200 ? `${+(x / 60).toFixed(1)} min` : `${+(x / 3600).toFixed(1)} h`;
  }
  if (settings.x === "wall") {
    const d = new Date(x * 1000), pad = n => String(n).padStart(2, "0");
    const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return span > 86400 ? `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock}` : clock;
  }
  return span < 10 ? +x.toFixed(2) : Math.round(x);
}

function legend(series) {
  return el("div", { class: "legend" },
    series.map((s, i) => el("span", {}, el("i", { style: `background:${COLORS[i % COLORS.length]}` }), s.label)));
}

// The x axis is the setting's: step, epoch, wall (the row's wall_time) or relative (seconds since the run's first
// row with a time, as TensorBoard's relative axis counts from a run's first point); a row without it is left out.
function seriesOf(history, key) {
  const x = settings.x === "relative" || settings.x === "wall" ? "wall_time" : settings.x;
  const first = history.find(h => typeof h.wall_time === "number");
  const t0 = settings.x === "relative" && first ? first.wall_time : 0;
  return history.filter(h => typeof h[key] === "number" && typeof h[x] === "number").map(h => [h[x] - t0, h[key]]);
}

// Every scalar the log holds, as TensorBoard shows every tag: the learning rate and grad norm first, then the rest
// (timings, counters and the axes left out).
function metricKeys(history) {
  const keys = new Set();
  for (const h of history) for (const [k, v] of Object.entries(h)) {
    if (typeof v === "number" && !/^(step|epoch|episode|eps|wall_time)$|runtime|per_second|total_flos|num_tokens|_steps$/.test(k)) keys.add(k);
  }
  const first = ["learning_rate", "grad_norm"].filter(k => keys.has(k));
  return [...first, ...[...keys].filter(k => !first.includes(k)).sort()];
}

function save() {
  try { localStorage.setItem("deltatune-board", JSON.stringify(settings)); } catch (e) { /* private mode */ }
}

// The smoothing slider and the x axis choice, above the charts of a run and of a comparison.
function controls() {
  const slider = el("input", { type: "range", id: "smoothing", min: "0", max: "0.999", step: "0.001", value: String(settings.smoothing) });
  const shown = el("span", { id: "smoothing-value" }, settings.smoothing.toFixed(3));
  slider.oninput = () => { settings.smoothing = Number(slider.value); shown.textContent = settings.smoothing.toFixed(3); };
  slider.onchange = () => { save(); render(); };
  const axis = el("select", { id: "x-axis" }, AXES.map(k => el("option", { value: k }, k)));
  axis.value = settings.x;
  // The list is open from a mousedown on it until a change, a blur, Escape or Enter (or CHOOSING_MS): polls wait.
  axis.onmousedown = () => { choosing = Date.now(); };
  axis.onblur = () => { choosing = 0; };
  axis.onkeyup = e => { if (e.key === "Escape" || e.key === "Enter") choosing = 0; };  // (the open list eats keydown)
  axis.onchange = () => { choosing = 0; settings.x = axis.value; save(); render(); };
  return el("p", { class: "controls" }, el("label", {}, "smoothing ", slider, " "), shown, el("label", {}, " x axis ", axis));
}

function ago(t) {
  const s = Math.max(0, Date.now() / 1000 - t);
  return !t ? "" : s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

function flatTable(id, obj) {
  const flat = flatten(obj, "", {});
  return el("table", { id }, el("tr", {}, el("th", {}, "recipe key"), el("th", {}, "value")),
    Object.keys(flat).sort().map(k => el("tr", {}, el("td", {}, k), el("td", {}, flat[k]))));
}

// -- views ----------------------------------------------------------------------------------------------
async function viewRuns(view) {
  const { runs } = await getJSON("/api/runs");
  const head = ["", "run", "stage", "method", "model", "status", "steps", "trainable params", "headline metrics"];
  const table = el("table", { id: "runs-table" }, el("tr", {}, head.map(h => el("th", {}, h))));
  for (const r of runs) {
    const box = el("input", { type: "checkbox", "data-run": r.name });
    box.checked = selected.has(r.name);
    box.onchange = () => { box.checked ? selected.add(r.name) : selected.delete(r.name); };
    const metrics = Object.entries(r.metrics).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
    table.append(el("tr", { "data-run": r.name },
      el("td", {}, box),
      el("td", {}, el("a", { href: `#run/${encodeURIComponent(r.name)}` }, r.name)),
      el("td", {}, r.stage), el("td", {}, r.method), el("td", {}, r.model),
      el("td", { class: `status-${r.status}`, title: `${r.reason ? r.reason + " · " : ""}updated ${ago(r.updated)}` }, r.status),
      el("td", { class: "num" }, fmt(r.steps)),
      el("td", { class: "num" }, fmt(r.trainable_params)),
      el("td", {}, metrics)));
  }
  const compare = el("button", { id: "compare-button", onclick: () => {
    location.hash = "#compare/" + [...selected].map(encodeURIComponent).join(",");
  } }, "Compare selected");
  view.replaceChildren(el("h2", {}, `Runs (${runs.length})`), runs.length ? table : el("p", { class: "muted" },
    "No runs in this folder yet (a run folder holds run.yaml)."), el("p", {}, compare));
}

async function viewRun(view, name) {
  const r = await getJSON("/api/run?name=" + encodeURIComponent(name));
  const loss = [{ label: "train loss", points: seriesOf(r.history, "loss") },
                { label: "eval loss", points: seriesOf(r.history, "eval_loss") }];
  const others = metricKeys(r.history).filter(k => k !== "loss" && k !== "eval_loss");
  const thinned = r.history_rows > r.history.length ? ` · curves of ${fmt(r.history.length)} of ${fmt(r.history_rows)} log rows` : "";
  const metrics = el("table", { id: "metrics-table" }, el("tr", {}, el("th", {}, "metric"), el("th", {}, "value")),
    Object.entries(r.all_metrics).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, fmt(v)))));
  const trainable = r.trainable_params === null ? "trainable parameters: when saved" : `${fmt(r.trainable_params)} trainable parameters`;
  if (held()) return;
  view.replaceChildren(el("div", {},
    el("h2", {}, `Run ${r.name} `, el("span", { class: `status-${r.status}`, id: "run-status" }, r.status)),
    r.reason ? el("p", { class: "error", id: "run-reason" }, r.reason) : null,
    el("p", { id: "run-facts" }, `${[r.stage, r.method, r.model].map(v => v ?? "?").join(" · ")} · ${trainable} · step ${r.steps} · updated ${ago(r.updated)}${thinned}`),
    controls(), legend(loss), chart("loss", loss, "loss-chart"),
    others.map(k => chart(k, [{ label: k, points: seriesOf(r.history, k) }])),
    el("h3", {}, "Final metrics"), Object.keys(r.all_metrics).length ? metrics : el("p", { class: "muted" }, "not yet"),
    el("h3", {}, "Recipe (run.yaml)"), flatTable("recipe-table", r.recipe),
    r.report ? [el("h3", {}, "report.md"), el("pre", {}, r.report)] : null));
}

function flatten(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out); else out[key] = JSON.stringify(v);
  }
  return out;
}

async function viewCompare(view, names) {
  if (!names.length) {
    view.replaceChildren(el("p", { class: "muted" }, "Select runs on the Runs page, then press Compare selected."));
    return;
  }
  // A run deleted (or renamed) since it was picked is named, not the end of the comparison.
  const got = await Promise.allSettled(names.map(n => getJSON("/api/run?name=" + encodeURIComponent(n))));
  const runs = got.filter(g => g.status === "fulfilled").map(g => g.value);
  const lost = names.filter((n, i) => got[i].status === "rejected");
  const gone = lost.length ? el("p", { class: "error", id: "compare-missing" }, `not found: ${lost.join(", ")}`) : null;
  const keys = [...new Set(runs.flatMap(r => Object.keys(r.all_metrics)))].sort();
  const metrics = el("table", { id: "compare-metrics" }, el("tr", {}, el("th", {}, "metric"), runs.map(r => el("th", {}, r.name))),
    el("tr", {}, el("td", {}, "trainable params"), runs.map(r => el("td", { class: "num" }, fmt(r.trainable_params)))),
    keys.map(k => el("tr", {}, el("td", {}, k), runs.map(r => el("td", { class: "num" }, fmt(r.all_metrics[k]))))));
  const flat = runs.map(r => flatten(r.recipe, "", {}));
  const recipeKeys = [...new Set(flat.flatMap(f => Object.keys(f)))].sort();
  const differing = recipeKeys.filter(k => new Set(flat.map(f => f[k])).size > 1);
  const diff = el("table", { id: "recipe-diff", class: "diff" }, el("tr", {}, el("th", {}, "recipe key"), runs.map(r => el("th", {}, r.name))),
    differing.map(k => el("tr", {}, el("td", {}, k), flat.map(f => el("td", { class: "changed" }, f[k] ?? "")))));
  const losses = runs.map(r => ({ label: `${r.name} loss`, points: seriesOf(r.history, "loss") }));
  const evals = runs.map(r => ({ label: `${r.name} eval loss`, points: seriesOf(r.history, "eval_loss") }));
  if (held()) return;
  view.replaceChildren(el("div", {}, el("h2", {}, `Compare ${runs.length} runs`), gone, metrics, controls(),
    el("h3", {}, "Training loss"), legend(losses), chart("train loss", losses, "compare-loss"),
    el("h3", {}, "Eval loss"), legend(evals), chart("eval loss", evals, "compare-eval"),
    el("h3", {}, `Recipe differences (${differing.length})`), differing.length ? diff : el("p", { class: "muted" }, "same recipe")));
}

async function viewPlay(view) {
  if (!config.playground) {
    view.replaceChildren(el("h2", {}, "Playground"), el("p", { class: "muted" },
      "No serve process: start the board with --serve http://127.0.0.1:8000 (a running `deltatune serve`), or " +
      "with --model and --adapter to start one inside the board."));
    return false;
  }
  const { data } = await getJSON(config.playground + "/models");
  const pick = el("select", { id: "adapter-picker" }, data.filter(m => m.id !== "base").map(m => el("option", { value: m.id }, `${m.id} (${m.method})`)));
  const withBase = el("input", { type: "checkbox", id: "base-toggle" });
  withBase.checked = true;
  const prompt = el("textarea", { id: "prompt" }, "Hello!");
  const maxTokens = el("input", { type: "number", id: "max-tokens", value: "32", min: "1", style: "width:5em" });
  const answers = el("div", { class: "answers", id: "answers" });
  async function ask(model) {
    const box = el("div", { "data-model": model }, el("h3", {}, model), el("p", { class: "muted" }, "…"));
    answers.append(box);
    try {
      const body = { model, messages: [{ role: "user", content: prompt.value }], max_tokens: Number(maxTokens.value), temperature: 0 };
      let out;
      try {
        out = await getJSON(config.playground + "/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
        out = out.choices[0].message.content;
      } catch (e) {  // a model without a chat template: plain completion
        if (!/chat template/.test(e.message)) throw e;
        const plain = { model, prompt: prompt.value, max_tokens: body.max_tokens, temperature: 0 };
        out = (await getJSON(config.playground + "/completions", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(plain) })).choices[0].text;
      }
      box.replaceChildren(el("h3", {}, model), el("p", { class: "answer" }, out));
    } catch (e) {
      box.replaceChildren(el("h3", {}, model), el("p", { class: "error" }, e.message));
    }
  }
  const send = el("button", { id: "send", onclick: async () => {
    answers.replaceChildren();
    const models = [pick.value, ...(withBase.checked ? ["base"] : [])].filter(Boolean);
    await Promise.all(models.map(ask));
  } }, "Send");
  view.replaceChildren(el("h2", {}, "Playground"),
    el("p", {}, "Adapter ", pick, " ", el("label", {}, withBase, " answer with the base model too (side by side)")),
    prompt, el("p", {}, "max tokens ", maxTokens, " ", send), answers);
  return false;
}

// -- routing --------------------------------------------------------------------------------------------
async function render(polled = false) {
  clearTimeout(timer);
  polling = polled === true;
  dropped = false;
  const view = document.getElementById("view");
  const [page, arg] = (location.hash.slice(1) || "runs").split(/\/(.*)/s);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.id === `nav-${page === "run" ? "runs" : page}`);
  let poll = true;
  try {
    if (page === "run") await viewRun(view, decodeURIComponent(arg || ""));
    else if (page === "compare") await viewCompare(view, (arg || "").split(",").filter(Boolean).map(decodeURIComponent));
    else if (page === "play") poll = await viewPlay(view);
    else await viewRuns(view);
  } catch (e) {
    view.replaceChildren(el("p", { class: "error" }, e.message));
  }
  if (!dropped) document.body.dataset.rendered = String(Date.now());
  if (poll) timer = setTimeout(repoll, POLL_MS);
}

// A poll waits while the smoothing slider is held or the x axis list is open: redrawing would take them away. A
// pointer is held until it is up or cancelled (a touch pan ends in pointercancel) or the window loses focus; the list
// is open from a mousedown on it (controls()), never longer than CHOOSING_MS (a list closed on the option it showed
// sends no event); a list that is only focused holds nothing.
let holding = false, choosing = 0, polling = false, dropped = false;
const CHOOSING_MS = 15000;
// A poll's answer that lands after the slider was grabbed or the list opened is dropped (a later poll draws): drawing
// it would rebuild the controls under the pointer and close the list.
function held() {
  dropped = polling && Boolean(holding || choosing);
  return dropped;
}
addEventListener("pointerdown", () => { holding = true; });
for (const type of ["pointerup", "pointercancel", "blur"]) addEventListener(type, () => { holding = false; });
function repoll() {
  if (choosing && Date.now() - choosing > CHOOSING_MS) choosing = 0;
  if (holding || choosing) timer = setTimeout(repoll, POLL_MS);
  else render(true);
}

window.addEventListener("hashchange", render);
getJSON("/api/config").then(c => { config = c; document.getElementById("runs-dir").textContent = c.runs_dir; }).finally(render);
