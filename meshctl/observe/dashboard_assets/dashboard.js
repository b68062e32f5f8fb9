// meshctl dashboard page: vanilla JS, no libraries, nothing fetched beyond this origin.
// Everything from the server reaches the DOM through textContent / setAttribute only, never innerHTML:
// pod names, log lines and trace roots are data from processes we do not control.
"use strict";

(() => {
  const SVGNS = "http://www.w3.org/2000/svg";
  const NODE_W = 220, NODE_H = 96;
  const EXT_W = 150, EXT_H = 32;
  // Wide enough for a two-line edge label between two columns.
  const COL_W = NODE_W + 200;
  const ROW_H = NODE_H + 64;
  const ARROW = 12;   // px the path stops short of its target; the marker fills the gap
  const POD_POLL_MS = 2000;
  const RECONNECT_MS = 3000;

  // The server answers only requests with its token: the cookie it set when the page was opened with ?token=,
  // or the token itself. Cookies ignore ports, so two dashboards on one host overwrite each other's; the token
  // from our own address keeps this page working regardless.
  const TOKEN = new URLSearchParams(location.search).get("token");
  const api = (path) => (TOKEN ? path + "?token=" + encodeURIComponent(TOKEN) : path);

  const $ = (id) => document.getElementById(id);
  const svg = $("graph"), gEdges = $("edges"), gNodes = $("nodes");
  const statusEl = $("status"), emptyEl = $("empty"), stage = $("stage");
  const panelEl = $("panel"), panelTitle = $("panel-title"), panelBody = $("panel-body");

  let view = null;           // last view shown
  let lastTime = -Infinity;  // the /api/view answer may arrive after a newer SSE event
  let layoutKey = null, pos = new Map(), bounds = null;
  const nodeEls = new Map(), extEls = new Map(), edgeEls = new Map();
  let unreachable = false;
  let refused = false;   // the server answers 403: retrying will not help until the page is reopened
  const panelState = { kind: null, pod: null, edge: null, timer: null, inflight: false, secs: null,
                       logs: new Map() };

  // ---------- formatting ----------
  const isNum = (v) => typeof v === "number" && isFinite(v);
  const fmtPct = (v) => (isNum(v) ? (v * 100).toFixed(2) + " %" : "-");
  const fmtCpu = (v) => (isNum(v) ? v.toFixed(2) + " %" : "-");
  const fmtRps = (v) => (isNum(v) ? v.toFixed(1) : "-");
  const fmtMs = (v) => (isNum(v) ? (Math.abs(v) < 1 ? v.toFixed(2) : v.toFixed(1)) : "-");
  const withMs = (v) => (isNum(v) ? fmtMs(v) + " ms" : "-"); // "-" alone: no unit on a missing number
  const fmtMiB = (b) => (isNum(b) ? (b / 1048576).toFixed(1) + " MiB" : "-");
  const fmtG = (v) => (isNum(v) ? String(+v.toFixed(2)) : "-");
  const pad2 = (n) => String(n).padStart(2, "0");
  function fmtClock(t) {
    if (!isNum(t)) return "-";
    const d = new Date(t * 1000);
    return pad2(d.getHours()) + ":" + pad2(d.getMinutes()) + ":" + pad2(d.getSeconds());
  }
  function fmtSecs(s) { return isNum(s) ? String(+s.toFixed(1)) + " s" : "-"; }
  function fmtAny(v) {
    if (v === null || v === undefined) return "-";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function describeFault(f) {
    const parts = [];
    if (f.abort_percent !== null && f.abort_percent !== undefined) {
      parts.push("abort " + fmtG(f.abort_percent) + "% (" + fmtAny(f.status) + ")");
    }
    if (f.delay_ms !== null && f.delay_ms !== undefined) {
      parts.push("delay " + fmtG(f.delay_ms) + " ms @ " + fmtG(f.delay_percent) + "%");
    }
    return parts.join(", ") || "fault";
  }

  // ---------- JSON with the server's own number spelling ----------
  // The DOM contract wants data-rps etc. "as given" (50.0 stays "50.0"); JS numbers forget that, so the
  // reviver's source text (JSON.parse source access) is kept for these keys, where the browser offers it.
  const RAW_KEYS = new Set(["rps", "success", "actual_success"]);
  function parseJSON(text) {
    let pending = {};
    const reviver = function (key, value, ctx) {
      if (RAW_KEYS.has(key) && ctx && typeof ctx.source === "string") {
        pending[key] = ctx.source;
      } else if (value && typeof value === "object" && !Array.isArray(value) &&
                 Object.prototype.hasOwnProperty.call(value, "rps")) {
        // Nested fault objects sit between an edge's numbers and the edge itself but carry no rps:
        // only an object with rps takes the pending spellings.
        Object.defineProperty(value, "__raw", { value: pending, enumerable: false });
        pending = {};
      }
      return value;
    };
    try { return JSON.parse(text, reviver); } catch (e) { return JSON.parse(text); }
  }
  function rawAttr(obj, key) {
    const v = obj[key];
    if (v === null || v === undefined) return "";
    const raw = obj.__raw && obj.__raw[key];
    return raw !== undefined && raw !== "null" ? raw : String(v);
  }

  // ---------- DOM helpers (touch the DOM only on change, so a tick repaints nothing that stayed) ----------
  function el(tag, attrs, parent) {
    const e = document.createElementNS(SVGNS, tag);
    if (attrs) for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function h(tag, cls, text, parent) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function setA(e, k, v) { if (e.getAttribute(k) !== v) e.setAttribute(k, v); }
  function setT(e, t) { if (e.textContent !== t) e.textContent = t; }
  function setCls(e, v) { if (e.getAttribute("class") !== v) e.setAttribute("class", v); }
  function setShown(e, shown) { setA(e, "display", shown ? "inline" : "none"); }

  // ---------- classification ----------
  function readyFull(r) {
    if (typeof r !== "string") return true;
    const m = /^(\d+)\/(\d+)$/.exec(r.trim());
    return !m || (m[1] === m[2] && +m[2] > 0);
  }
  function podState(p) {
    const s = String(p.status || "").toLowerCase();
    if (p.crashloop || s.startsWith("crashloop")) return "bad";
    if (s.startsWith("down")) return "down";
    if (s === "running" && readyFull(p.ready)) return "ok";
    return "warn";
  }
  function successState(v) {
    if (!isNum(v)) return "none";
    return v >= 0.99 ? "ok" : v >= 0.95 ? "warn" : "bad";
  }
  function edgeWidth(rps) {
    return isNum(rps) && rps > 0 ? Math.min(7, 1.5 + 2 * Math.log10(1 + rps)) : 1.5;
  }
  const edgeKey = (e) => e.from + "\u0000" + e.to;
  const targetKey = (e, pods) => (e.to_pod && pods.has(e.to_pod) ? e.to_pod : "cluster:" + e.to);

  // ---------- layout: callers left, callees right ----------
  // Recomputed only when the set of pods or edges changes, so nodes never move while numbers tick.
  function computeLayout(pods, edges) {
    const names = pods.map((p) => p.pod);
    const known = new Set(names);
    const byName = names.slice().sort();
    const out = new Map(byName.map((n) => [n, new Set()]));
    const indeg = new Map(byName.map((n) => [n, 0]));
    const touched = new Set();
    for (const e of edges) {
      if (!known.has(e.from)) continue;
      touched.add(e.from);
      if (e.to_pod && known.has(e.to_pod)) {
        touched.add(e.to_pod);
        if (e.to_pod !== e.from && !out.get(e.from).has(e.to_pod)) {
          out.get(e.from).add(e.to_pod);
          indeg.set(e.to_pod, indeg.get(e.to_pod) + 1);
        }
      }
    }
    // Cycles: a DFS from the sources (then anyone left) drops back edges, leaving a DAG.
    const state = new Map(), dag = new Map(byName.map((n) => [n, []])), order = [];
    const visit = (n) => {
      state.set(n, 1);
      for (const m of [...out.get(n)].sort()) {
        if (!state.has(m)) { dag.get(n).push(m); visit(m); }
        else if (state.get(m) === 2) dag.get(n).push(m);
      }
      state.set(n, 2);
      order.push(n);
    };
    for (const n of byName) if (indeg.get(n) === 0 && !state.has(n)) visit(n);
    for (const n of byName) if (!state.has(n)) visit(n);
    order.reverse();  // topological
    const layer = new Map(byName.map((n) => [n, 0]));
    for (const n of order) for (const m of dag.get(n)) layer.set(m, Math.max(layer.get(m), layer.get(n) + 1));

    const cols = [];
    const put = (key, l, kind) => { (cols[l] = cols[l] || []).push({ key, kind }); };
    for (const n of byName) if (touched.has(n)) put(n, layer.get(n), "pod");
    const extLayer = new Map();
    for (const e of edges) {
      if (!known.has(e.from)) continue;
      const t = targetKey(e, known);
      if (known.has(t)) continue;
      extLayer.set(t, Math.max(extLayer.get(t) || 0, layer.get(e.from) + 1));
    }
    for (const [t, l] of [...extLayer].sort()) put(t, l, "ext");

    // Inside a column: barycentre of the callers already placed (fewer crossings), then name.
    const preds = new Map();
    for (const e of edges) {
      if (!known.has(e.from)) continue;
      const t = targetKey(e, known);
      if (!preds.has(t)) preds.set(t, []);
      preds.get(t).push(e.from);
    }
    const rank = new Map();
    const result = new Map();
    let maxHalf = 0;
    for (let c = 0; c < cols.length; c++) {
      const col = cols[c] || [];
      const score = (it) => {
        const ps = (preds.get(it.key) || []).filter((p) => rank.has(p));
        return ps.length ? ps.reduce((a, p) => a + rank.get(p), 0) / ps.length : Infinity;
      };
      col.forEach((it) => { it.score = score(it); });
      // Infinity - Infinity is NaN, falsy: callers-less items fall through to the name.
      col.sort((a, b) => (a.score - b.score) || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
      const n = col.length;
      col.forEach((it, i) => {
        rank.set(it.key, i - (n - 1) / 2);
        result.set(it.key, { x: c * COL_W, y: (i - (n - 1) / 2) * ROW_H, kind: it.kind, col: c });
      });
      maxHalf = Math.max(maxHalf, ((n - 1) / 2) * ROW_H);
    }
    // Pods without any edge: one row of their own under the graph.
    const lonely = byName.filter((n) => !touched.has(n));
    if (lonely.length) {
      const y0 = cols.length ? maxHalf + ROW_H * 1.15 : 0;
      const step = NODE_W + 40;
      const width = (lonely.length - 1) * step;
      const mid = cols.length ? ((cols.length - 1) * COL_W) / 2 : 0;
      lonely.forEach((n, i) => result.set(n, { x: mid - width / 2 + i * step, y: y0, kind: "pod", col: -1 }));
    }
    return result;
  }

  function structureKey(pods, edges) {
    const p = pods.map((x) => x.pod).sort().join("\u0001");
    const e = edges.map((x) => x.from + ">" + (x.to_pod || "") + ">" + x.to).sort().join("\u0001");
    return p + "\u0002" + e;
  }

  // ---------- geometry ----------
  function boxOf(key) {
    const p = pos.get(key);
    if (!p) return null;
    const w = p.kind === "ext" ? EXT_W : NODE_W, hgt = p.kind === "ext" ? EXT_H : NODE_H;
    return { x: p.x, y: p.y, w, h: hgt, col: p.col };
  }
  // A cubic Bézier from the caller's right side to the callee's left side; edges that go back (or stay in a
  // column) leave and enter underneath so they do not cut through the nodes between.
  function edgeGeometry(a, b, k, n, fanIn, self, flatBelow) {
    const off = (k - (n - 1) / 2) * 16;
    let p0, p1, p2, p3, text = null;
    if (self) {
      // A loop on the right side, entering back leftwards a little lower.
      const x = a.x + a.w / 2, y = a.y + off;
      p0 = [x, y - 14]; p1 = [x + 60, y - 50]; p2 = [x + 60, y + 50]; p3 = [x + ARROW, y + 14];
      // Above the node: the column gaps beside it belong to other edges' labels.
      const top = a.y - a.h / 2;
      text = { x: a.x, l1: top - 23, l2: top - 10, f0: top - 36, fstep: -13 };
    } else if (b.x - b.w / 2 > a.x + a.w / 2 + 20) {
      const x0 = a.x + a.w / 2, y0 = a.y + off;
      const x3 = b.x - b.w / 2 - ARROW, y3 = b.y + off;
      const dx = Math.max(40, (x3 - x0) / 2);
      p0 = [x0, y0]; p1 = [x0 + dx, y0]; p2 = [x3 - dx, y3]; p3 = [x3, y3];
      // A label at the midpoint of a steep curve is crossed by it. The curve stays between the heights of
      // its ends, so the label goes just beyond one of them: the target's for a caller's fan-out (the
      // targets' heights keep the labels apart), the caller's for a fan-in. Faults stack away from the line.
      const cx = (x0 + x3) / 2;
      const above = (y) => ({ x: cx, l1: y - 23, l2: y - 10, f0: y - 36, fstep: -13 });
      const below = (y) => ({ x: cx, l1: y + 20, l2: y + 33, f0: y + 46, fstep: 13 });
      if (y3 < y0 - 24) text = fanIn ? below(y0) : above(y3);
      else if (y3 > y0 + 24) text = fanIn ? above(y0) : below(y3);
    } else {
      const x0 = a.x + off, y0 = a.y + a.h / 2;
      const x3 = b.x + off, y3 = b.y + b.h / 2 + ARROW;
      const dip = Math.max(y0, y3) + 70 + Math.abs(a.x - b.x) * 0.08;
      p0 = [x0, y0]; p1 = [x0, dip]; p2 = [x3, dip]; p3 = [x3, y3];
    }
    const d = `M${p0[0].toFixed(1)},${p0[1].toFixed(1)} C${p1[0].toFixed(1)},${p1[1].toFixed(1)} ` +
              `${p2[0].toFixed(1)},${p2[1].toFixed(1)} ${p3[0].toFixed(1)},${p3[1].toFixed(1)}`;
    if (!text) {
      const [mx, my] = [0, 1].map((i) => (p0[i] + 3 * p1[i] + 3 * p2[i] + p3[i]) / 8);
      // Under the line when a sibling from the same caller climbs through the space above it.
      text = flatBelow ? { x: mx, l1: my + 20, l2: my + 33, f0: my + 46, fstep: 13 }
                       : { x: mx, l1: my - 20, l2: my - 7, f0: my + 17, fstep: 13 };
    }
    return { d, text };
  }

  // ---------- nodes ----------
  function makeNode(pod) {
    const g = el("g", { class: "node", "data-pod": pod, tabindex: "0" });
    const title = el("title", null, g);
    const rect = el("rect", { class: "box", width: NODE_W, height: NODE_H, rx: 10, ry: 10 }, g);
    const name = el("text", { class: "name", x: 12, y: 21 }, g);
    name.textContent = pod;
    const reps = el("text", { class: "reps", x: 12, y: 21 }, g);
    const status = el("text", { class: "status", x: 12, y: 39 }, g);
    const res = el("text", { class: "res", x: 12, y: 56 }, g);
    const inbound = el("text", { class: "inbound", x: 12, y: 73 }, g);
    const nosc = el("text", { class: "nosc", x: 12, y: 88 }, g);
    nosc.textContent = "no sidecar";
    const badge = el("g", { class: "badge" }, g);
    const badgeRect = el("rect", { x: NODE_W - 62, y: 6, width: 54, height: 17, rx: 8, ry: 8 }, badge);
    const badgeText = el("text", { x: NODE_W - 35, y: 18, "text-anchor": "middle" }, badge);
    badgeText.textContent = "⚡ fault";
    const badgeTitle = el("title", null, badge);
    g.addEventListener("click", (ev) => { ev.stopPropagation(); openPod(pod); });
    g.addEventListener("keydown", (ev) => { if (ev.key === "Enter") openPod(pod); });
    gNodes.appendChild(g);
    return { g, title, rect, name, reps, status, res, inbound, nosc, badge, badgeRect, badgeText, badgeTitle,
             repsText: null };
  }
  function clip(s, n) { return s.length > n ? s.slice(0, n - 1) + "…" : s; }
  function updateNode(n, p) {
    const b = boxOf(p.pod);
    setA(n.g, "transform", `translate(${(b.x - NODE_W / 2).toFixed(1)},${(b.y - NODE_H / 2).toFixed(1)})`);
    const st = podState(p);
    setCls(n.g, "node s-" + st + (p.engine === null ? " nosidecar" : "") +
                (panelState.kind === "pod" && panelState.pod === p.pod ? " selected" : ""));
    setA(n.g, "data-status", String(p.status ?? ""));
    const reps = Array.isArray(p.replicas) && p.replicas.length > 1 ? "×" + p.replicas.length : "";
    if (reps !== n.repsText) {
      n.repsText = reps;
      setT(n.reps, reps);
      // After the name, wherever it ends (measured once: the name never changes).
      setA(n.reps, "x", (12 + n.name.getComputedTextLength() + 6).toFixed(1));
    }
    const status = String(p.status ?? "-");
    const restarts = p.restarts ? " · ↻ " + p.restarts : "";
    setT(n.status, clip(status, 34 - restarts.length) + restarts);
    setT(n.res, "ready " + (p.ready ?? "-") + " · CPU " + fmtCpu(p.cpu_percent) + " · " + fmtMiB(p.rss_bytes));
    const hasIn = [p.success, p.rps, p.p99_ms].some(isNum);
    setT(n.inbound, hasIn ? `in ${fmtPct(p.success)} · ${fmtRps(p.rps)} rps · p99 ${withMs(p.p99_ms)}` : "");
    setShown(n.nosc, p.engine === null);
    const faults = Array.isArray(p.faults) ? p.faults : [];
    setShown(n.badge, faults.length > 0);
    setT(n.badgeTitle, faults.map((f) => (f.cluster ? f.cluster + ": " : "") + describeFault(f)).join("\n"));
    setT(n.title, `${p.pod}: ${status}` + (p.engine ? ` (sidecar: ${p.engine})` : " (no sidecar)"));
  }
  function makeExt(key) {
    const g = el("g", { class: "external", "data-to": key });
    el("title", null, g).textContent = "outside the mesh: " + key.slice(8);
    el("rect", { width: EXT_W, height: EXT_H, rx: 16, ry: 16 }, g);
    const t = el("text", { x: EXT_W / 2, y: EXT_H / 2 + 4, "text-anchor": "middle" }, g);
    t.textContent = clip(key.slice(8), 22);
    gNodes.appendChild(g);
    return { g };
  }

  // ---------- edges ----------
  function makeEdge(e) {
    const g = el("g", { class: "edge" });
    const title = el("title", null, g);
    const hit = el("path", { class: "hit" }, g);
    const line = el("path", { class: "line" }, g);
    // The label comes first in the group: it is the edge's <text> the contract speaks of. Two tspans
    // whose textContent is the one-line label, drawn on two lines to keep columns narrow.
    const label = el("text", { class: "label", "text-anchor": "middle" }, g);
    const t1 = el("tspan", null, label), t2 = el("tspan", null, label);
    const fault = el("text", { class: "fault", "text-anchor": "middle" }, g);
    const key = edgeKey(e);
    g.addEventListener("click", (ev) => { ev.stopPropagation(); openEdge(key); });
    gEdges.appendChild(g);
    return { g, title, hit, line, label, t1, t2, fault };
  }
  function edgeLabel(e) {
    return [`${fmtRps(e.rps)} rps · ${fmtPct(e.success)} (${fmtPct(e.actual_success)})`,
            ` · p99 ${withMs(e.p99_ms)} · ${fmtRps(e.retries_per_s)} retries/s`];
  }
  function updateEdge(x, e, geo, known) {
    const sc = successState(e.success);
    setCls(x.g, "edge c-" + sc + (panelState.kind === "edge" && panelState.edge === edgeKey(e) ? " selected" : ""));
    setA(x.g, "data-from", String(e.from));
    setA(x.g, "data-to", e.to_pod ? String(e.to_pod) : "cluster:" + e.to);
    setA(x.g, "data-cluster", String(e.to));
    setA(x.g, "data-success", rawAttr(e, "success"));
    setA(x.g, "data-actual", rawAttr(e, "actual_success"));
    setA(x.g, "data-rps", rawAttr(e, "rps"));
    setA(x.line, "d", geo.d);
    setA(x.hit, "d", geo.d);
    setA(x.line, "stroke-width", edgeWidth(e.rps).toFixed(2));
    setA(x.line, "marker-end", `url(#arrow-${sc})`);
    const [l1, l2] = edgeLabel(e);
    setT(x.t1, l1);
    setT(x.t2, l2);
    const tp = geo.text, mx = tp.x.toFixed(1);
    setA(x.t1, "x", mx); setA(x.t1, "y", tp.l1.toFixed(1));
    setA(x.t2, "x", mx); setA(x.t2, "y", tp.l2.toFixed(1));
    // One line per fault part under the edge: in one line they outgrow the gap between two columns.
    const faults = Array.isArray(e.faults) ? e.faults : [];
    const parts = faults.flatMap((f) => describeFault(f).split(", ")).map((t) => "⚡ " + t);
    const ftext = parts.join("") + "@" + mx + "," + tp.f0.toFixed(1) + "," + tp.fstep;
    if (x.faultText !== ftext) {
      x.faultText = ftext;
      x.fault.textContent = "";
      parts.forEach((t, i) => {
        const ts = el("tspan", { x: mx, y: (tp.f0 + tp.fstep * i).toFixed(1) }, x.fault);
        ts.textContent = t;
      });
    }
    setT(x.title, `${e.from} → ${e.to}` + (e.to_pod ? ` (pod ${e.to_pod})` : " (outside the mesh)") +
                  `\nsuccess after retries ${fmtPct(e.success)}, per attempt ${fmtPct(e.actual_success)}` +
                  `\ntimeouts ${fmtRps(e.timeouts_per_s)}/s`);
  }

  // ---------- whole view ----------
  function render(v) {
    const running = v.running !== false;
    document.body.dataset.running = running ? "true" : "false";
    renderStatus(v);
    const pods = Array.isArray(v.pods) ? v.pods : [];
    const edges = Array.isArray(v.edges) ? v.edges : [];
    const known = new Set(pods.map((p) => p.pod));

    const key = structureKey(pods, edges);
    const relayout = key !== layoutKey;
    if (relayout) {
      layoutKey = key;
      pos = computeLayout(pods, edges);
    }

    // nodes
    const seen = new Set();
    for (const p of pods) {
      seen.add(p.pod);
      let n = nodeEls.get(p.pod);
      if (!n) { n = makeNode(p.pod); nodeEls.set(p.pod, n); }
      updateNode(n, p);
    }
    for (const [k, n] of nodeEls) if (!seen.has(k)) { n.g.remove(); nodeEls.delete(k); }

    // external targets
    const extSeen = new Set();
    for (const e of edges) {
      if (!known.has(e.from)) continue;
      const t = targetKey(e, known);
      if (known.has(t) || extSeen.has(t)) continue;
      extSeen.add(t);
      let x = extEls.get(t);
      if (!x) { x = makeExt(t); extEls.set(t, x); }
      const b = boxOf(t);
      setA(x.g, "transform", `translate(${(b.x - EXT_W / 2).toFixed(1)},${(b.y - EXT_H / 2).toFixed(1)})`);
    }
    for (const [k, x] of extEls) if (!extSeen.has(k)) { x.g.remove(); extEls.delete(k); }

    // edges; parallel ones between the same pair are fanned out
    const pairs = new Map();
    for (const e of edges) {
      if (!known.has(e.from)) continue;
      const pk = e.from + "\u0000" + targetKey(e, known);
      if (!pairs.has(pk)) pairs.set(pk, []);
      pairs.get(pk).push(e);
    }
    const outDeg = new Map(), inDeg = new Map(), climbs = new Set();
    for (const pk of pairs.keys()) {
      const [f, t] = pk.split("\u0000");
      outDeg.set(f, (outDeg.get(f) || 0) + 1);
      inDeg.set(t, (inDeg.get(t) || 0) + 1);
      const a = boxOf(f), b = boxOf(t);
      if (a && b && b.x > a.x && b.y < a.y - 24) climbs.add(f);
    }
    const edgeSeen = new Set();
    for (const list of pairs.values()) {
      list.sort((a, b) => (a.to < b.to ? -1 : a.to > b.to ? 1 : 0));
      list.forEach((e, i) => {
        const k = edgeKey(e);
        if (edgeSeen.has(k)) return;
        edgeSeen.add(k);
        let x = edgeEls.get(k);
        if (!x) { x = makeEdge(e); edgeEls.set(k, x); }
        const t = targetKey(e, known);
        const geo = edgeGeometry(boxOf(e.from), boxOf(t), i, list.length, inDeg.get(t) > outDeg.get(e.from),
                                 e.from === t, climbs.has(e.from));
        updateEdge(x, e, geo, known);
      });
    }
    for (const [k, x] of edgeEls) if (!edgeSeen.has(k)) { x.g.remove(); edgeEls.delete(k); }

    if (!running) {
      showEmpty(notRunningText(v));
    } else if (!pods.length) {
      showEmpty(v.mesh ? `no pods in mesh ${v.mesh}` : "no mesh found" + (v.message ? ": " + v.message : ""));
    } else {
      showEmpty(null);
    }
    if (relayout) fit();
    refreshPanelFromView();
  }

  function showEmpty(text) {
    if (text) { setT(emptyEl, text); emptyEl.hidden = false; } else if (!emptyEl.hidden) emptyEl.hidden = true;
  }

  function notRunningText(v) {
    const m = v.message ? String(v.message) : "";
    return m.startsWith("mesh not running") ? m : "mesh not running" + (m ? ": " + m : "");
  }

  function renderStatus(v) {
    statusEl.textContent = "";
    const mesh = v.mesh ? "mesh " + v.mesh : "no mesh";
    if (v.running === false) {
      h("span", "mesh", mesh, statusEl);
      statusEl.append(" · " + notRunningText(v) + " · checked " + fmtClock(v.time));
      return;
    }
    h("span", "mesh", mesh, statusEl);
    let s = " · updated " + fmtClock(v.time) + " · window " + fmtSecs(v.window_s);
    s += isNum(v.measured_s) ? " (measured " + fmtSecs(v.measured_s) + ")" : " (measuring…)";
    if (v.traced) s += " · tracing on";
    if (v.message) s += " · " + v.message;
    statusEl.append(s);
  }

  function renderUnreachable() {
    if (refused) {
      statusEl.textContent = "dashboard server refused this page's token (restarted?): " +
                             "open the address meshctl dashboard printed";
      return;
    }
    statusEl.textContent = "dashboard server unreachable, retrying" +
      (view ? " · last update " + fmtClock(view.time) : "");
  }

  // Fit the drawing into the SVG without ever scaling it up: a two-pod mesh stays readable, not huge.
  function fit() {
    const keys = [...pos.keys()];
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const k of keys) {
      const b = boxOf(k);
      x0 = Math.min(x0, b.x - b.w / 2); x1 = Math.max(x1, b.x + b.w / 2);
      y0 = Math.min(y0, b.y - b.h / 2); y1 = Math.max(y1, b.y + b.h / 2);
    }
    if (!keys.length) { x0 = -100; y0 = -100; x1 = 100; y1 = 100; }
    // Room for labels above the top edge and the dip of back edges below.
    x0 -= 40; x1 += 40; y0 -= 50; y1 += 110;
    const r = svg.getBoundingClientRect();
    const cw = Math.max(r.width, 100), ch = Math.max(r.height, 100);
    let w = x1 - x0, hh = y1 - y0;
    if (w < cw) { x0 -= (cw - w) / 2; w = cw; }
    if (hh < ch) { y0 -= (ch - hh) / 2; hh = ch; }
    bounds = [x0, y0, w, hh];
    setA(svg, "viewBox", bounds.map((n) => n.toFixed(1)).join(" "));
  }
  let fitQueued = false;
  function queueFit() {
    if (fitQueued) return;
    fitQueued = true;
    requestAnimationFrame(() => { fitQueued = false; fit(); });
  }
  window.addEventListener("resize", queueFit);
  if (window.ResizeObserver) new ResizeObserver(queueFit).observe(svg);

  function accept(v) {
    if (!v || typeof v !== "object") return;
    if (isNum(v.time) && v.time < lastTime) return;
    if (isNum(v.time)) lastTime = v.time;
    view = v;
    refused = false;
    if (unreachable) { unreachable = false; document.body.classList.remove("unreachable"); }
    render(v);
  }

  // ---------- data ----------
  let es = null;
  function connect() {
    es = new EventSource(api("/api/events"));
    es.addEventListener("view", (ev) => {
      let v;
      try { v = parseJSON(ev.data); } catch (err) { return; }
      accept(v);
    });
    es.addEventListener("open", () => {
      if (unreachable) { unreachable = false; document.body.classList.remove("unreachable"); if (view) renderStatus(view); }
    });
    es.addEventListener("error", () => {
      unreachable = true;
      document.body.classList.add("unreachable");
      renderUnreachable();
      // CONNECTING: the browser retries by itself. CLOSED (e.g. a non-stream answer): it gave up, so do we
      // ourselves, a little later.
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        setTimeout(connect, RECONNECT_MS);
        // An EventSource cannot tell why; a plain request can (a restarted server has a new token).
        fetch(api("/api/view"), { cache: "no-store" }).then((r) => {
          refused = r.status === 403;
          if (unreachable) renderUnreachable();
        }).catch(() => {});
      }
    });
  }
  fetch(api("/api/view"), { cache: "no-store" })
    .then((r) => (r.ok ? r.text() : Promise.reject(new Error("HTTP " + r.status))))
    .then((t) => accept(parseJSON(t)))
    .catch(() => { if (!view) { unreachable = true; document.body.classList.add("unreachable"); renderUnreachable(); } });
  connect();

  // ---------- side panel ----------

  function openPanel() {
    panelEl.hidden = false;
    stage.classList.add("panel-open");
  }
  function closePanel() {
    clearInterval(panelState.timer);
    Object.assign(panelState, { kind: null, pod: null, edge: null, timer: null, secs: null });
    panelState.logs = new Map();
    panelEl.hidden = true;
    panelEl.removeAttribute("data-pod");
    panelEl.removeAttribute("data-edge");
    stage.classList.remove("panel-open");
    if (view) render(view);
  }
  $("panel-close").addEventListener("click", closePanel);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && !panelEl.hidden) closePanel(); });

  function section(title) {
    const s = h("section", null, null, panelBody);
    h("h3", null, title, s);
    const body = h("div", null, null, s);
    return body;
  }

  function openPod(pod) {
    if (panelState.kind === "pod" && panelState.pod === pod) return;
    clearInterval(panelState.timer);
    panelState.kind = "pod"; panelState.pod = pod; panelState.edge = null;
    panelState.logs = new Map();
    panelEl.dataset.pod = pod;
    panelEl.removeAttribute("data-edge");
    panelTitle.textContent = pod;
    panelBody.textContent = "";
    panelBody.scrollTop = 0;
    panelState.secs = {
      summary: section("pod"),
      processes: section("processes"),
      faults: section("active faults"),
      traces: section("recent traces"),
      logs: section("logs (last lines)"),
    };
    h("div", "note", "loading…", panelState.secs.processes);
    openPanel();
    if (view) render(view);
    fetchPod();
    panelState.timer = setInterval(fetchPod, POD_POLL_MS);
  }

  function fetchPod() {
    const pod = panelState.pod;
    if (panelState.kind !== "pod" || panelState.inflight) return;
    panelState.inflight = true;
    fetch(api("/api/pods/" + encodeURIComponent(pod)), { cache: "no-store" })
      .then((r) => r.text().then((t) => ({ ok: r.ok, status: r.status, t })))
      .then(({ ok, status, t }) => {
        if (panelState.kind !== "pod" || panelState.pod !== pod) return;
        let d = null;
        try { d = JSON.parse(t); } catch (e) { d = null; }
        if (!ok || !d) {
          renderPodError(((d && d.error) || "HTTP " + status));
        } else {
          renderPodDetails(d);
        }
      })
      .catch(() => {
        if (panelState.kind === "pod" && panelState.pod === pod) renderPodError("dashboard server unreachable, retrying");
      })
      .finally(() => { panelState.inflight = false; });
  }

  function renderPodError(msg) {
    const s = panelState.secs;
    s.processes.textContent = "";
    h("div", "error", msg, s.processes);
  }

  function table(parent, heads, rows, numeric) {
    const t = h("table", null, null, parent);
    const tr = h("tr", null, null, h("thead", null, null, t));
    heads.forEach((x, i) => h("th", numeric && numeric[i] ? "num" : null, x, tr));
    const tb = h("tbody", null, null, t);
    for (const row of rows) {
      const r = h("tr", null, null, tb);
      row.forEach((c, i) => {
        const td = h("td", numeric && numeric[i] ? "num" : null, null, r);
        if (c && typeof c === "object" && c.text !== undefined) {
          td.textContent = c.text;
          if (c.cls) td.className += (td.className ? " " : "") + c.cls;
          if (c.title) td.title = c.title;
        } else {
          td.textContent = c;
        }
      });
    }
    return t;
  }
  function kv(parent, pairs) {
    const t = h("table", "kv", null, parent);
    for (const [k, v, cls] of pairs) {
      const r = h("tr", null, null, t);
      h("td", null, k, r);
      h("td", cls || null, v, r);
    }
  }

  function renderFaults(parent, faults) {
    parent.textContent = "";
    if (!faults || !faults.length) { h("div", "note", "none", parent); return; }
    for (const f of faults) {
      const line = h("div", null, null, parent);
      if (f.cluster) h("code", null, f.cluster + ": ", line);
      h("span", "fault", "⚡ " + describeFault(f), line);
      if (Array.isArray(f.replicas) && f.replicas.length) line.append(" on " + f.replicas.join(", "));
    }
  }

  function procState(p) {
    const s = String(p.state || "").toLowerCase();
    if (s.includes("crash") || s.includes("fail") || s === "down" || s.includes("exit")) return "st-bad";
    if (s === "running" && p.ready !== false) return "st-ok";
    return "st-warn";
  }

  function renderPodDetails(d) {
    const s = panelState.secs;
    // processes
    s.processes.textContent = "";
    const procs = Array.isArray(d.processes) ? d.processes : [];
    if (!procs.length) h("div", "note", "no processes", s.processes);
    else {
      table(s.processes, ["replica", "role", "pid", "state", "ready", "restarts", "CPU", "RSS", "last exit"],
        procs.map((p) => [p.replica ?? "-", p.role ?? "-", fmtAny(p.pid), { text: fmtAny(p.state), cls: procState(p) },
                          p.ready === true ? "yes" : p.ready === false ? "no" : "-", fmtAny(p.restarts),
                          fmtCpu(p.cpu_percent), fmtMiB(p.rss_bytes), { text: fmtAny(p.last_exit), cls: "wrap" }]),
        [false, false, true, false, false, true, true, true, false]);
    }
    renderFaults(s.faults, d.faults);
    // traces
    s.traces.textContent = "";
    if (d.traces === null || d.traces === undefined) h("div", "note", "tracing off", s.traces);
    else if (!d.traces.length) h("div", "note", "no traces yet", s.traces);
    else {
      table(s.traces, ["trace", "root", "ms", "spans", "errors", "retries"],
        d.traces.map((t) => [{ text: String(t.trace_id ?? "-").slice(0, 12), title: String(t.trace_id ?? "") },
                             { text: fmtAny(t.root), cls: "wrap", title: (t.services || []).join(" → ") },
                             fmtMs(t.duration_ms), fmtAny(t.spans),
                             { text: fmtAny(t.errors), cls: t.errors ? "st-bad" : "" },
                             { text: fmtAny(t.retries), cls: t.retries ? "st-warn" : "" }]),
        [false, false, true, true, true, true]);
    }
    renderLogs(s.logs, Array.isArray(d.logs) ? d.logs : []);
  }

  // Log boxes are kept across polls: rebuilding them would throw away the reader's scroll position.
  function renderLogs(parent, logs) {
    const want = [];
    for (const l of logs) {
      const key = (l.replica ?? "") + "\u0000" + (l.role ?? "");
      let box = panelState.logs.get(key);
      if (!box) {
        const wrap = h("div");
        h("div", "logname", `${l.replica ?? "?"} · ${l.role ?? "?"}`, wrap);
        const pre = h("pre", "log", null, wrap);
        box = { wrap, pre, first: true };
        panelState.logs.set(key, box);
      }
      const lines = Array.isArray(l.lines) ? l.lines : [];
      const text = lines.length ? lines.join("\n") : "(no output)";
      if (box.pre.textContent !== text) {
        const atBottom = box.pre.scrollTop + box.pre.clientHeight >= box.pre.scrollHeight - 4;
        box.pre.textContent = text;
        if (atBottom || box.first) box.pre.scrollTop = box.pre.scrollHeight;
      }
      box.first = false;
      want.push(box.wrap);
    }
    for (const [k, b] of panelState.logs) if (!want.includes(b.wrap)) panelState.logs.delete(k);
    const same = want.length === parent.children.length && want.every((w, i) => parent.children[i] === w);
    if (!same) {
      parent.replaceChildren(...want);
      for (const b of panelState.logs.values()) b.pre.scrollTop = b.pre.scrollHeight;
    }
    if (!want.length) h("div", "note", "no logs", parent);
  }

  function refreshPanelFromView() {
    if (!view) return;
    if (panelState.kind === "pod" && panelState.secs) {
      const p = (view.pods || []).find((x) => x.pod === panelState.pod);
      const s = panelState.secs.summary;
      s.textContent = "";
      if (!p) { h("div", "note", view.running === false ? "mesh not running" : "not in the current view", s); return; }
      const st = podState(p);
      kv(s, [
        ["status", String(p.status ?? "-"), "st-" + (st === "down" ? "bad" : st)],
        ["ready", String(p.ready ?? "-")],
        ["replicas", Array.isArray(p.replicas) ? p.replicas.join(", ") : "-"],
        ["restarts", fmtAny(p.restarts)],
        ["sidecar", p.engine ? String(p.engine) : "no sidecar"],
        ["CPU · memory", fmtCpu(p.cpu_percent) + " · " + fmtMiB(p.rss_bytes)],
        ["inbound success", fmtPct(p.success)],
        ["inbound rps", fmtRps(p.rps)],
        ["p50 · p95 · p99", `${fmtMs(p.p50_ms)} · ${fmtMs(p.p95_ms)} · ${fmtMs(p.p99_ms)} ms`],
        ["retries/s · upstream 5xx/s", `${fmtRps(p.retries_per_s)} · ${fmtRps(p.upstream_5xx_per_s)}`],
      ]);
    } else if (panelState.kind === "edge") {
      const e = (view.edges || []).find((x) => edgeKey(x) === panelState.edge);
      panelBody.textContent = "";
      const s = section("edge");
      if (!e) { h("div", "note", "not in the current view", s); return; }
      kv(s, [
        ["from", String(e.from)],
        ["cluster", String(e.to)],
        ["to pod", e.to_pod ? String(e.to_pod) : "outside the mesh"],
        ["requests/s", fmtRps(e.rps)],
        ["success after retries", fmtPct(e.success), "st-" + (successState(e.success) === "none" ? "" : successState(e.success))],
        ["success per attempt", fmtPct(e.actual_success)],
        ["retries/s", fmtRps(e.retries_per_s)],
        ["timeouts/s", fmtRps(e.timeouts_per_s)],
        ["p99", withMs(e.p99_ms)],
      ]);
      renderFaults(section("active faults"), e.faults);
    }
  }

  function openEdge(key) {
    clearInterval(panelState.timer);
    Object.assign(panelState, { kind: "edge", pod: null, edge: key, timer: null, secs: null });
    panelState.logs = new Map();
    panelEl.removeAttribute("data-pod");
    panelEl.dataset.edge = key.replace("\u0000", " → ");
    panelTitle.textContent = key.replace("\u0000", " → ");
    openPanel();
    if (view) render(view);
  }
})();
