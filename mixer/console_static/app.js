// The Mixer console page: four views over /api/v1 (docs/console.md). No framework and no
// build step: DOM calls only (the content security policy forbids inline script and style),
// every text set with textContent (nothing from the server is ever parsed as HTML).
"use strict";

const $main = document.getElementById("main");
let me = { user: "", role: "viewer" };
let events = null;         // the fleet's EventSource
let leave = () => {};      // what the current view stops when another is shown

// -- helpers ---------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (r.status === 401) { location.href = "/login"; throw new Error("logged out"); }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return v.toLocaleString(undefined, { maximumFractionDigits: digits ?? 1 });
  return String(v);
}

function badge(text) { return el("span", { class: "badge " + String(text).split(":")[0] }, text); }

function svgEl(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function line(values, w, h, cls) {
  const svg = svgEl("svg", { class: cls, width: w, height: h, viewBox: `0 0 ${w} ${h}` });
  const nums = values.map(Number).filter((x) => Number.isFinite(x));
  if (nums.length < 2) return svg;
  const lo = Math.min(...nums), hi = Math.max(...nums), span = hi - lo || 1;
  const pts = nums.map((v, i) => `${(i / (nums.length - 1)) * (w - 2) + 1},${h - 1 - ((v - lo) / span) * (h - 2)}`);
  svg.append(svgEl("polyline", { points: pts.join(" ") }));
  return svg;
}

// -- fleet -----------------------------------------------------------------------------
const FIELDS = [["frames_per_s", "frames/s", 1], ["p99_ms", "p99 ms", 1], ["errors", "errors", 0],
                ["cpu_pct", "CPU %", 1], ["rss_mib", "RSS MiB", 0], ["backlog", "backlog", 0],
                ["link", "link", 0]];

// One table row per rack, built once; a live update sets the text of the cells that changed
// and the sparkline's points (1,000 racks change every second: rebuilding rows was the cost)
function fleetRow(r) {
  const cells = { state: el("td", { class: "state" }), labels: el("td", { class: "labels" }),
                  version: el("td", {}), rig: el("td", { class: "muted" }) };
  for (const [k] of FIELDS) cells[k] = el("td", { class: "num " + k });
  const spark = line([0, 0], 90, 18, "spark");
  const tr = el("tr", { id: "rack-" + r.rack },
                el("td", {}, el("a", { href: "#/rack/" + encodeURIComponent(r.rack) }, r.rack)),
                cells.state, cells.labels, cells.version, cells.rig,
                ...FIELDS.map(([k]) => cells[k]), el("td", { class: "spark" }, spark));
  const view = { tr, cells, spark, shown: {} };
  setRow(view, r);
  return view;
}

function setText(view, key, text) {
  if (view.shown[key] !== text) { view.shown[key] = text; view.cells[key].textContent = text; }
}

function setRow(view, r) {
  view.row = r;
  if (view.shown.state !== r.state) {
    view.shown.state = r.state;
    view.tr.setAttribute("data-state", r.state);
    view.cells.state.replaceChildren(badge(r.state));
  }
  const labels = JSON.stringify(r.labels || {});
  if (view.shown.labels !== labels) {
    view.shown.labels = labels;
    view.cells.labels.replaceChildren(...Object.entries(r.labels || {}).map(([k, v]) => el("span", {}, `${k}=${v}`)));
  }
  setText(view, "version", fmt(r.version));
  setText(view, "rig", r.rig || "–");
  for (const [k, , d] of FIELDS) setText(view, k, fmt(r[k], d));
  const fresh = line(r.spark || [], 90, 18, "spark");
  const pts = fresh.firstChild ? fresh.firstChild.getAttribute("points") : "";
  let poly = view.spark.firstChild;
  if (!poly && pts) { poly = svgEl("polyline", { points: pts }); view.spark.append(poly); }
  else if (poly) poly.setAttribute("points", pts);
}

function fleetMatches(r, filter) {
  return Object.entries(filter).every(([k, v]) => (r.labels || {})[k] === v);
}

function parseFilter(text) {
  const out = {};
  for (const part of text.split(/[,\s]+/).filter(Boolean)) {
    const [k, ...rest] = part.split("=");
    if (k && rest.length) out[k] = rest.join("=");
  }
  return out;
}

async function showFleet() {
  const filterBox = el("input", { id: "filter", placeholder: "label filter: site=lyon role=switch", size: 40 });
  const counts = el("span", { id: "counts", class: "muted" });
  const body = el("tbody", { id: "fleet-body" });
  const head = el("tr", {}, ...["rack", "state", "labels", "version", "rig"].map((h) => el("th", {}, h)),
                  ...FIELDS.map(([, h]) => el("th", { class: "num" }, h)), el("th", {}, "last minute"));
  $main.replaceChildren(el("h2", {}, "Fleet ", counts), el("p", {}, filterBox),
                        el("table", { id: "fleet" }, el("thead", {}, head), body));
  const views = new Map();  // rack -> its row's view
  let filter = {};
  const count = () => {
    const by = {};
    for (const v of views.values()) by[v.row.state] = (by[v.row.state] || 0) + 1;
    counts.textContent = `${views.size} racks — ` + Object.entries(by).map(([s, n]) => `${n} ${s}`).join(", ");
  };
  const place = (v) => { v.tr.hidden = !fleetMatches(v.row, filter); };
  filterBox.addEventListener("input", () => { filter = parseFilter(filterBox.value); views.forEach(place); });
  const load = async () => {
    const doc = await api("/api/v1/fleet");
    views.clear();
    const rows = doc.racks.map((r) => { const v = fleetRow(r); views.set(r.rack, v); place(v); return v.tr; });
    body.replaceChildren(...rows);
    count();
    // when the rows are on screen (the frame after they were added): perf/console_bench.py
    requestAnimationFrame(() => performance.mark("fleet-shown"));
  };
  await load();
  const onFleet = (ev) => {
    window.fluxrigUpdates = (window.fluxrigUpdates || 0) + 1;  // perf/console_bench.py counts
    const doc = JSON.parse(ev.data);
    for (const r of doc.racks) {
      const v = views.get(r.rack);
      if (r.state === "removed") { if (v) { v.tr.remove(); views.delete(r.rack); } continue; }
      const spark = (v?.row.spark || []).concat([r.spark_last]).slice(-60);
      const row = Object.assign({}, r, { spark });
      if (v) setRow(v, row);
      else { const nv = fleetRow(row); views.set(r.rack, nv); body.append(nv.tr); }
      place(views.get(r.rack));
    }
    count();
  };
  const onReset = () => load();
  events.addEventListener("fleet", onFleet);
  events.addEventListener("reset", onReset);
  leave = () => { events.removeEventListener("fleet", onFleet); events.removeEventListener("reset", onReset); };
}

// -- one rack --------------------------------------------------------------------------
async function showRack(id) {
  const box = el("div", { id: "rack" });
  $main.replaceChildren(el("h2", {}, "Rack ", el("span", { id: "rack-id" }, id)), box);
  let stopped = false;
  const draw = async () => {
    let r;
    try { r = await api("/api/v1/racks/" + encodeURIComponent(id)); }
    catch (e) { box.replaceChildren(el("p", { class: "err" }, e.message)); return; }
    const procs = (r.snapshot?.processes || []).map((p) => el("tr", { "data-process": p.name },
      el("td", {}, p.name), el("td", {}, p.role), el("td", { class: "num" }, fmt(p.pid)),
      el("td", { class: "num frames-out" }, fmt(p.frames_out, 0)), el("td", { class: "num" }, fmt(p.frames_in, 0)),
      el("td", { class: "num" }, fmt(p.errors, 0)), el("td", { class: "num" }, p.ring_fill == null ? "–" : fmt(100 * p.ring_fill) + "%"),
      el("td", { class: "num" }, fmt(p.cpu_pct)), el("td", { class: "num" }, fmt((p.rss || 0) / 1048576, 0)),
      el("td", { class: "num" }, p.p99_ns == null ? "–" : fmt(p.p99_ns / 1e6, 2))));
    const errs = (r.recent_errors || []).map((e) => el("li", {}, `${e.ts_at} ${e.process}: +${e.count}`));
    const cfg = r.config || {};
    const parts = [
      el("p", {}, badge(r.state), " version ", fmt(r.version), " · rig ", r.rig || "–",
         " · backlog ", fmt(r.backlog, 0), " · host CPU ", fmt(r.snapshot?.host_cpu_pct), "%"),
      el("h3", {}, "Processes"),
      el("table", { id: "processes" }, el("thead", {}, el("tr", {}, ...["process", "role", "pid", "out", "in", "errors", "ring fill", "CPU %", "RSS MiB", "p99 ms"].map((h) => el("th", {}, h)))), el("tbody", {}, ...procs)),
      el("h3", {}, "Recent errors"), errs.length ? el("ul", { id: "recent-errors" }, ...errs) : el("p", { class: "muted" }, "none seen"),
      el("h3", {}, "Config"),
    ];
    if (cfg.state) parts.push(el("p", {}, "deployed rev ", fmt(cfg.state.rev), ", applied ", fmt(cfg.state.applied), " ", badge(cfg.state.status), " ", cfg.state.error || ""));
    if (cfg.current) {
      parts.push(el("div", { class: "cols" },
        el("div", {}, el("h3", {}, `rev ${cfg.current.rev}`), el("pre", { id: "config-text" }, cfg.current.text)),
        el("div", {}, el("h3", {}, "diff against the previous"), el("pre", { id: "config-diff" }, cfg.diff || "(first revision)"))));
    } else parts.push(el("p", { class: "muted" }, "never deployed from the Mixer"));
    if (me.role === "admin") {
      const text = el("textarea", { id: "deploy-text", placeholder: "a rig (YAML) to deploy to this rack" });
      const msg = el("p", { id: "deploy-msg" });
      const send = async (body) => {
        try { const out = await api(`/api/v1/racks/${encodeURIComponent(id)}/deploy`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
              msg.className = ""; msg.textContent = `${out.what}: rev ${out.rev}`; }
        catch (e) { msg.className = "err"; msg.textContent = e.message; }
      };
      parts.push(el("h3", {}, "Deploy"), text, el("p", {}, el("button", { class: "primary", id: "deploy", onclick: () => send({ text: text.value }) }, "Deploy")),
                 el("p", {}, ...(cfg.revisions || []).slice(0, -1).map((rev) => el("button", { class: "rollback", onclick: () => send({ rev }) }, `Roll back to rev ${rev}`))), msg);
    }
    if (!stopped && !document.activeElement?.matches("textarea")) box.replaceChildren(...parts);
  };
  await draw();
  const timer = setInterval(draw, 2000);
  leave = () => { stopped = true; clearInterval(timer); };
}

// -- transactions ----------------------------------------------------------------------
const TXN_COLS = ["ts", "rack", "mti", "terminal", "stan", "token", "pan", "amount", "currency", "de39", "outcome", "issuer", "latency_us"];

async function showTransactions() {
  const today = new Date().toISOString().slice(0, 10);
  const inputs = {};
  const field = (name, label, attrs) => { inputs[name] = el("input", Object.assign({ name, id: "q-" + name }, attrs || {})); return el("label", {}, label, inputs[name]); };
  const results = el("div", { id: "results" });
  const detail = el("div", { id: "detail" });
  const form = el("form", { class: "search", id: "search" },
    field("terminal", "terminal"), field("stan", "STAN", { size: 8 }), field("token", "token", { size: 20 }),
    field("de39", "DE39", { size: 4 }), field("from", "from", { type: "date" }), field("to", "to", { type: "date" }),
    field("amount_min", "amount ≥", { size: 8 }), field("amount_max", "amount ≤", { size: 8 }),
    el("button", { class: "primary", type: "submit", id: "search-go" }, "Search"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, i] of Object.entries(inputs)) if (i.value) q.set(k, i.value);
    try {
      const doc = await api("/api/v1/transactions?" + q);
      const rows = doc.transactions.map((t) => {
        const tr = el("tr", { class: "txn", "data-event": t.event_id }, ...TXN_COLS.map((c) => el("td", { class: c }, fmt(t[c], 0))));
        tr.addEventListener("click", () => showEvent(t.event_id, detail));
        return tr;
      });
      results.replaceChildren(el("p", { class: "muted" }, `${rows.length} found`),
        el("table", { id: "txns" }, el("thead", {}, el("tr", {}, ...TXN_COLS.map((c) => el("th", {}, c)))), el("tbody", {}, ...rows)));
    } catch (e) { results.replaceChildren(el("p", { class: "err" }, e.message)); }
  });
  const chart = el("div", { id: "daily" });
  const day = el("input", { type: "date", id: "daily-date", value: today });
  day.addEventListener("change", () => drawDaily(day.value, chart));
  $main.replaceChildren(el("h2", {}, "Transactions"), form, results, detail,
                        el("h3", {}, "Daily report ", day), chart);
  drawDaily(today, chart);
}

async function showEvent(id, box) {
  try {
    const doc = await api("/api/v1/transactions/" + encodeURIComponent(id));
    box.replaceChildren(el("h3", {}, "Event ", id, " ", badge(doc.chain.state), doc.chain.here.length ? " " + doc.chain.here.map((f) => f.kind).join(", ") + " in this part" : ""),
                        el("p", { class: "muted" }, `chain of ${doc.rack}/${doc.stream}: ${doc.chain.rows} rows in ${doc.chain.files} parts; part ${doc.part}`),
                        el("pre", { id: "event-json" }, JSON.stringify(doc.event, null, 2)));
  } catch (e) { box.replaceChildren(el("p", { class: "err" }, e.message)); }
}

async function drawDaily(date, box) {
  let doc;
  try { doc = await api("/api/v1/reports/daily?date=" + date); }
  catch (e) { box.replaceChildren(el("p", { class: "err" }, e.message)); return; }
  const ci = doc.columns.indexOf("de39"), ni = doc.columns.indexOf("events");
  const by = {};
  for (const r of doc.rows) by[r[ci] ?? "–"] = (by[r[ci] ?? "–"] || 0) + r[ni];
  const keys = Object.keys(by).sort();
  if (!keys.length) { box.replaceChildren(el("p", { class: "muted" }, "no transactions that day")); return; }
  const w = 60 * keys.length + 20, h = 160, max = Math.max(...Object.values(by));
  const svg = svgEl("svg", { class: "chart", width: w, height: h });
  keys.forEach((k, i) => {
    const bh = (by[k] / max) * (h - 40);
    svg.append(svgEl("rect", { x: 10 + i * 60, y: h - 20 - bh, width: 40, height: bh }));
    const t1 = svgEl("text", { x: 10 + i * 60, y: h - 5 }); t1.textContent = "DE39 " + k; svg.append(t1);
    const t2 = svgEl("text", { x: 10 + i * 60, y: h - 25 - bh }); t2.textContent = fmt(by[k], 0); svg.append(t2);
  });
  box.replaceChildren(svg);
}

// -- namespace -------------------------------------------------------------------------
async function showNamespace() {
  const tree = el("div", { class: "tree", id: "uns-tree" });
  const trend = el("div", { id: "trend" });
  $main.replaceChildren(el("h2", {}, "Namespace"), el("div", { class: "cols" }, tree, trend));
  const draw = async () => {
    let doc;
    try { doc = await api("/api/v1/uns"); } catch (e) { tree.replaceChildren(el("p", { class: "err" }, e.message)); return; }
    const root = {};
    for (const s of doc.samples) {
      let node = root;
      for (const part of s.path.split(".")) node = node[part] = node[part] || {};
      node.__sample = s;
    }
    const build = (node) => el("ul", {}, ...Object.entries(node).filter(([k]) => k !== "__sample").sort().map(([k, v]) => {
      if (v.__sample) {
        const s = v.__sample;
        const li = el("li", { class: "leaf", "data-path": s.path },
          k, " = ", el("strong", {}, fmt(s.value, 3)), " ", s.unit || "", " ", badge(s.quality || "unknown"), " ", el("span", { class: "muted" }, s.rack));
        li.addEventListener("click", () => drawTrend(s, trend));
        return li;
      }
      return el("li", {}, el("span", { class: "node" }, k), build(v));
    }));
    tree.replaceChildren(doc.samples.length ? build(root) : el("p", { class: "muted" }, "no UNS samples at the hub yet"));
  };
  await draw();
  const timer = setInterval(draw, 5000);
  leave = () => clearInterval(timer);
}

async function drawTrend(s, box) {
  const since = Date.now() / 1000 - 3600;
  const doc = await api(`/api/v1/uns/history?rack=${encodeURIComponent(s.rack)}&path=${encodeURIComponent(s.path)}&since=${since}`);
  const vals = doc.samples.map((x) => x.value).filter((v) => typeof v === "number");
  box.replaceChildren(el("h3", {}, s.path, ` (${s.rack}, last hour, ${doc.samples.length} samples)`),
                      vals.length > 1 ? line(vals, 480, 160, "trend") : el("p", { class: "muted" }, "not a number, or a single sample"));
}

// -- routing ---------------------------------------------------------------------------
function route() {
  leave(); leave = () => {};
  const [, view, arg] = location.hash.split("/");
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("on", a.id === "nav-" + (view || "fleet"));
  if (view === "rack" && arg) return showRack(decodeURIComponent(arg));
  if (view === "transactions") return showTransactions();
  if (view === "namespace") return showNamespace();
  return showFleet();
}

async function start() {
  me = await api("/api/v1/me");
  document.getElementById("who").textContent = `${me.user} (${me.role})`;
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/api/v1/logout", { method: "POST" }); location.href = "/login";
  });
  const live = document.getElementById("live");
  events = new EventSource("/api/v1/fleet/events");
  events.addEventListener("hello", () => { live.className = "live on"; live.textContent = "live"; });
  events.onerror = () => { live.className = "live off"; live.textContent = "reconnecting"; };
  window.addEventListener("hashchange", route);
  route();
}

start();
