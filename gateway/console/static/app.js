// tunegate console: plain JavaScript, no build step, no dependencies. Every text from the API
// is set with textContent (never parsed as HTML). The session lives in an HttpOnly cookie; the
// CSRF token is kept in memory only and sent as X-CSRF-Token on every change.
"use strict";

let csrf = null;
let me = null;
let timer = null;

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

async function api(method, path, body, raw) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = csrf || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {method, headers, credentials: "same-origin",
                               body: body === undefined ? undefined : JSON.stringify(body)});
  if (r.status === 401) { showSignIn(); throw new Error("signed out"); }
  if (raw) return r;
  if (r.status === 204) return null;
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v === "number") return v.toFixed(digits === undefined ? 3 : digits);
  return String(v);
}
function ago(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "–"; }
function dur(sec) {
  if (sec === null || sec === undefined) return "–";
  sec = Math.max(0, Math.round(sec));
  return sec >= 3600 ? `${Math.floor(sec / 3600)} h ${Math.round((sec % 3600) / 60)} min`
    : sec >= 60 ? `${Math.floor(sec / 60)} min ${sec % 60} s` : `${sec} s`;
}
function badge(text) { return h("span", {class: `badge ${text}`, text}); }
function table(headers, rows, onRow) {
  return h("div", {class: "table-wrap"}, h("table", {},
    h("thead", {}, h("tr", {}, headers.map(t => h("th", {scope: "col", text: t})))),
    h("tbody", {}, rows.map((cells, i) => {
      const tr = h("tr", onRow ? {class: "click", tabindex: "0", role: "link"} : {},
                   cells.map(c => h("td", {}, c)));
      if (onRow) {
        tr.addEventListener("click", () => onRow(i));
        tr.addEventListener("keydown", e => { if (e.key === "Enter") onRow(i); });
      }
      return tr;
    }))));
}

// ---- plots: SVG line charts drawn here --------------------------------------------------------
const COLORS = ["#1d4ed8", "#b91c1c", "#047857", "#7c3aed", "#c2410c", "#0e7490"];
function lineChart(series, opts) {
  // series: [{name, points: [[x, y], ...]}]; opts: {title, xLabel, yLabel, hline, hlineLabel}
  const W = 640, H = 240, L = 52, R = 12, T = 22, B = 30;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                        "aria-label": opts.title});
  svg.append(s("title", {}, opts.title));
  const pts = series.flatMap(x => x.points).filter(p => p[1] !== null && p[1] !== undefined);
  svg.append(s("text", {x: L, y: 14}, opts.title));
  if (!pts.length) { svg.append(s("text", {x: W / 2 - 40, y: H / 2}, "no data yet")); return svg; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let ys = pts.map(p => p[1]);
  if (opts.hline !== undefined && opts.hline !== null) ys = ys.concat([opts.hline]);
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (opts.yMin !== undefined) y0 = Math.min(y0, opts.yMin);
  if (opts.yMax !== undefined) y1 = Math.max(y1, opts.yMax);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += 1; y0 -= y0 === 0 ? 0 : 1; }
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.append(s("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9ca3af"}));
  svg.append(s("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#9ca3af"}));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    svg.append(s("text", {x: 4, y: Y(y) + 4}, opts.yFmt ? opts.yFmt(y) : y.toPrecision(3)));
    svg.append(s("line", {x1: L, y1: Y(y), x2: W - R, y2: Y(y), stroke: "#f3f4f6"}));
  }
  svg.append(s("text", {x: L, y: H - 8}, opts.xFmt ? opts.xFmt(x0) : String(x0)));
  svg.append(s("text", {x: W - R - 60, y: H - 8}, opts.xFmt ? opts.xFmt(x1) : String(x1)));
  if (opts.xLabel) svg.append(s("text", {x: W / 2 - 20, y: H - 8}, opts.xLabel));
  if (opts.hline !== undefined && opts.hline !== null) {
    svg.append(s("line", {x1: L, x2: W - R, y1: Y(opts.hline), y2: Y(opts.hline),
                          stroke: "#f59e0b", "stroke-dasharray": "5 4"}));
    svg.append(s("text", {x: W - R - 120, y: Y(opts.hline) - 4}, opts.hlineLabel || ""));
  }
  series.forEach((ser, i) => {
    const color = COLORS[i % COLORS.length];
    const p = ser.points.filter(q => q[1] !== null && q[1] !== undefined);
    if (!p.length) return;
    svg.append(s("polyline", {fill: "none", stroke: color, "stroke-width": 2,
                              points: p.map(q => `${X(q[0])},${Y(q[1])}`).join(" "),
                              "data-points": String(p.length), class: "series"}));
    if (p.length < 60) p.forEach(q => svg.append(s("circle", {cx: X(q[0]), cy: Y(q[1]), r: 2.5,
                                                              fill: color})));
    if (series.length > 1) svg.append(s("text", {x: L + 8 + 110 * i, y: T + 12, fill: color},
                                        ser.name));
  });
  return svg;
}

function stateMachine(current) {
  // The promotion state machine, the current state filled.
  const main = ["candidate", "shadow", "canary", "stable"];
  const W = 640, H = 110;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                        "aria-label": `promotion state: ${current || "none"}`});
  const box = (x, y, name) => {
    const on = name === current;
    svg.append(s("rect", {x, y, width: 110, height: 30, rx: 6, fill: on ? "#1d4ed8" : "#fff",
                          stroke: "#1d4ed8", "data-state": name, class: on ? "current" : ""}));
    svg.append(s("text", {x: x + 55, y: y + 20, "text-anchor": "middle",
                          class: on ? "state on" : "state"}, name));
  };
  main.forEach((name, i) => {
    box(10 + i * 160, 12, name);
    if (i < 3) svg.append(s("line", {x1: 120 + i * 160, y1: 27, x2: 170 + i * 160, y2: 27,
                                     stroke: "#6b7280", "marker-end": "url(#arrow)"}));
  });
  const defs = s("defs");
  const marker = s("marker", {id: "arrow", markerWidth: 8, markerHeight: 8, refX: 7, refY: 4,
                              orient: "auto"});
  marker.append(s("path", {d: "M0,0 L8,4 L0,8 z", fill: "#6b7280"}));
  defs.append(marker);
  svg.prepend(defs);
  box(170, 70, "rejected");
  box(490, 70, "rolled_back");
  return svg;
}

// ---- session ------------------------------------------------------------------------------------
function showSignIn() {
  clearInterval(timer);
  csrf = null; me = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("signin").hidden = false;
  document.getElementById("view").replaceChildren();
  document.getElementById("key").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  const input = document.getElementById("key");
  const err = document.getElementById("signin-error");
  err.textContent = "";
  const r = await fetch("/console/session", {method: "POST", credentials: "same-origin",
                                             headers: {Authorization: `Bearer ${input.value}`}});
  input.value = "";
  const data = await r.json().catch(() => ({}));
  if (!r.ok) { err.textContent = (data.error && data.error.message) || "sign-in failed"; return; }
  csrf = data.csrf; me = data.key;
  started();
}

async function resume() {
  const r = await fetch("/console/session", {credentials: "same-origin"});
  if (!r.ok) { showSignIn(); return; }
  const data = await r.json();
  csrf = data.csrf; me = data.key;
  started();
}

function started() {
  document.getElementById("signin").hidden = true;
  document.getElementById("nav").hidden = false;
  if (!location.hash || location.hash === "#") location.hash = "#/overview";
  else route();
}

async function signOut() {
  try { await api("DELETE", "/console/session"); } catch (e) { /* signed out anyway */ }
  location.hash = "";
  showSignIn();
}

// ---- pages --------------------------------------------------------------------------------------
function put(el, ...kids) {
  // replaceChildren would print null as "null": drop the absent parts first.
  el.replaceChildren(...kids.flat().filter(k => k !== null && k !== undefined && k !== false));
  return el;
}
function view(...kids) { return put(document.getElementById("view"), ...kids); }
function every(ms, fn) { clearInterval(timer); fn(); timer = setInterval(fn, ms); }
function confirmed(text) { return window.confirm(text); }
function failure(e) { return h("p", {class: "error", role: "alert", text: String(e.message || e)}); }

async function overview() {
  const box = h("div", {});
  view(h("h1", {text: "Overview"}), box);
  every(5000, async () => {
    try {
      const [o, reps] = await Promise.all([api("GET", "/console/api/overview"),
                                           api("GET", "/admin/replicas")]);
      const t = o.traffic.map((b, i) => i);
      put(box, 
        h("div", {class: "grid"},
          h("div", {class: "card"}, h("div", {class: "muted", text: "sampled requests, last hour"}),
            h("div", {class: "stat", text: o.sampled_last_hour})),
          h("div", {class: "card"}, h("div", {class: "muted", text: "errors, last hour"}),
            h("div", {class: "stat", text: o.errors_last_hour})),
          h("div", {class: "card"}, h("div", {class: "muted", text: "TTFT p95 (streams), ms"}),
            h("div", {class: "stat", text: fmt(o.ttft_p95_ms, 0)})),
          h("div", {class: "card"}, h("div", {class: "muted", text: "quota refusals (since start)"}),
            h("div", {class: "stat", text: o.quota_refusals}))),
        h("h2", {text: "Traffic (sampled), 5-minute buckets"}),
        h("div", {class: "grid"},
          lineChart([{name: "requests", points: o.traffic.map((b, i) => [t[i], b.requests])},
                     {name: "errors", points: o.traffic.map((b, i) => [t[i], b.errors])}],
                    {title: "requests and errors per 5 min", xFmt: x => `${(x - 11) * 5} min`}),
          lineChart([{name: "latency p95", points: o.traffic.map((b, i) => [t[i], b.latency_p95_ms])},
                     {name: "TTFT p95", points: o.traffic.map((b, i) => [t[i], b.ttft_p95_ms])}],
                    {title: "p95 latency and TTFT, ms", xFmt: x => `${(x - 11) * 5} min`})),
        h("h2", {text: "Replicas"}),
        table(["replica", "healthy", "in flight", "adapters held"], reps.data.map(r => [
          r.url, badge(r.healthy ? "healthy" : "down"), fmt(r.in_flight, 0),
          (r.adapters || r.loaded || []).join(", ") || "–"])),
        h("h2", {text: "Running jobs"}),
        o.jobs.length ? table(["job", "suffix", "status", "step"], o.jobs.map(j => [
          h("a", {href: `#/jobs/${j.id}`, text: j.id}), j.suffix, badge(j.status),
          j.progress ? `${j.progress.step}/${j.progress.total_steps}` : "–"]))
          : h("p", {class: "muted", text: "none"}),
        h("h2", {text: "Active promotions"}),
        o.promotions.length ? table(["version", "state", "waiting"], o.promotions.map(p => [
          h("a", {href: `#/models/${encodeURIComponent(p.name)}`, text: p.ref}), badge(p.state),
          p.waiting || "–"])) : h("p", {class: "muted", text: "none"}));
    } catch (e) { put(box, failure(e)); }
  });
}

async function jobs() {
  const box = h("div", {});
  view(h("h1", {text: "Fine-tuning jobs"}), box);
  every(5000, async () => {
    try {
      const list = await api("GET", "/v1/fine_tuning/jobs?limit=50");
      put(box, table(["job", "suffix", "status", "progress", "model", "created"],
        list.data.map(j => {
          const p = j.tunegate && j.tunegate.progress;
          return [j.id, j.suffix || "–", badge(j.status),
                  p ? `${p.step}/${p.total_steps}` : "–", j.fine_tuned_model || "–",
                  ago(j.created_at)];
        }), i => { location.hash = `#/jobs/${list.data[i].id}`; }));
    } catch (e) { put(box, failure(e)); }
  });
}

function parseCsv(text) {
  const [head, ...lines] = text.trim().split("\n");
  const cols = head.split(",");
  return lines.filter(Boolean).map(l => Object.fromEntries(
    l.split(",").map((v, i) => [cols[i], Number(v)])));
}

async function job(id) {
  const box = h("div", {});
  view(h("p", {}, h("a", {href: "#/jobs", text: "← jobs"})), h("h1", {text: id}), box);
  every(2000, async () => {
    try {
      const j = await api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`);
      const ev = await api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?limit=100`);
      let rows = [];
      if (j.result_files.length) {
        const r = await api("GET", `/v1/files/${j.result_files[0]}/content`, undefined, true);
        if (r.ok) rows = parseCsv(await r.text());
      }
      const t = j.tunegate || {};
      const res = t.result || {};
      const p = t.progress || {};
      const gate = res.gate || {};
      const before = res.base_eval ? res.base_eval.score : null;
      const after = res.eval ? res.eval.score : null;
      const last = rows.length ? rows[rows.length - 1] : {};
      const left = j.estimated_finish ? j.estimated_finish - Date.now() / 1000 : null;
      const cancel = h("button", {class: "danger", type: "button", text: "Cancel job",
        disabled: !["validating_files", "queued", "running"].includes(j.status),
        onclick: async () => {
          if (!confirmed(`Cancel ${id}?`)) return;
          try { await api("POST", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`); }
          catch (e) { box.prepend(failure(e)); }
        }});
      put(box, 
        h("div", {class: "grid"},
          h("div", {class: "card"}, h("div", {class: "muted", text: "status"}), badge(j.status),
            j.fine_tuned_model ? h("div", {}, "model: ", h("code", {text: j.fine_tuned_model})) : null),
          h("div", {class: "card"}, h("div", {class: "muted", text: "step"}),
            h("div", {class: "stat", id: "job-step",
                      text: `${last.step || p.step || 0}/${p.total_steps || t.total_steps || "?"}`})),
          h("div", {class: "card"}, h("div", {class: "muted", text: "training loss"}),
            h("div", {class: "stat", text: fmt(last.train_loss)})),
          h("div", {class: "card"}, h("div", {class: "muted", text: "learning rate · tokens/s"}),
            h("div", {class: "stat", text: `${last.learning_rate ? last.learning_rate.toExponential(2) : "–"} · ${fmt(last.tokens_per_s, 0)}`})),
          h("div", {class: "card"}, h("div", {class: "muted", text: "ETA"}),
            h("div", {class: "stat", text: j.status === "running" ? dur(left) : "–"})),
          h("div", {class: "card"}, h("div", {class: "muted", text: "golden accuracy: before → after (gate)"}),
            h("div", {class: "stat", text: `${fmt(before, 2)} → ${fmt(after, 2)}`}),
            h("div", {class: gate.passed ? "ok" : "muted",
                      text: gate.reason ? `gate: ${gate.reason}` : `gate threshold ${fmt(gate.threshold, 2)}`}))),
        h("div", {class: "actions"}, cancel),
        h("div", {class: "grid charts"},
          h("div", {id: "loss-chart"}, lineChart([{name: "loss", points: rows.map(r => [r.step, r.train_loss])}],
                    {title: "training loss per step", xLabel: "step"})),
          lineChart([{name: "learning rate", points: rows.map(r => [r.step, r.learning_rate])}],
                    {title: "learning rate", xLabel: "step", yFmt: y => y.toExponential(1)}),
          lineChart([{name: "tokens/s", points: rows.map(r => [r.step, r.tokens_per_s])}],
                    {title: "tokens per second", xLabel: "step"}),
          lineChart([{name: "after", points: after === null ? [] : [[0, before], [1, after]]}],
                    {title: "golden accuracy before → after", hline: gate.threshold,
                     hlineLabel: "gate threshold", yMin: 0, yMax: 1})),
        t.rollout ? h("p", {class: "card", text: t.rollout.message}) : null,
        h("h2", {text: "Events"}),
        table(["time", "level", "message"], ev.data.map(e => [ago(e.created_at), e.level, e.message])));
    } catch (e) { put(box, failure(e)); }
  });
}

async function models() {
  clearInterval(timer);
  const list = await api("GET", "/admin/adapters");
  view(h("h1", {text: "Models"}),
       table(["name", "versions", "aliases"], list.data.map(a => [
         a.name, a.versions, Object.entries(a.aliases).map(([k, v]) => `${k} → v${v}`).join(", ")]),
         i => { location.hash = `#/models/${encodeURIComponent(list.data[i].name)}`; }));
}

async function model(name) {
  clearInterval(timer);
  const q = encodeURIComponent(name);
  const [a, quality] = await Promise.all([api("GET", `/admin/adapters/${q}`),
                                          api("GET", `/console/api/quality/${q}`)]);
  let promo = null;
  try { promo = await api("GET", `/admin/promotions/${q}`); } catch (e) { promo = null; }
  const msg = h("p", {role: "status"});
  const act = (label, cls, question, fn) => h("button", {type: "button", class: cls, text: label,
    onclick: async () => {
      if (!confirmed(question)) return;
      try { await fn(); route(); } catch (e) { put(msg, failure(e)); }
    }});
  const versions = a.versions.map(v => v.version);
  const pick = h("select", {id: "version-pick", "aria-label": "version"},
                 versions.map(v => h("option", {value: v, text: `v${v}`})));
  if (versions.length) pick.value = String(versions[versions.length - 1]);
  const alias = h("input", {id: "alias-name", value: "latest", "aria-label": "alias", size: 10});
  const active = promo && ["candidate", "shadow", "canary"].includes(promo.state);
  const byVersion = {};
  quality.data.filter(r => r.score !== null).forEach(r => {
    const key = `v${r.version} ${r.kind}`;
    (byVersion[key] = byVersion[key] || []).push([Date.parse(r.at) / 1000, r.score]);
  });
  view(h("p", {}, h("a", {href: "#/models", text: "← models"})), h("h1", {text: name}), msg,
    h("h2", {text: "Versions"}),
    table(["version", "created", "dataset", "job", "golden score", "aliases"], a.versions.map(v => {
      const m = v.manifest || {};
      return [`v${v.version}`, v.created_at || "–",
              ((m.datasets || {}).training_sha256 || "–").slice(0, 12), m.job_id || "–",
              fmt((m.metrics || {}).golden_score, 2),
              Object.entries(a.aliases).filter(([, n]) => n === v.version).map(([k]) => k).join(", ")];
    })),
    h("h2", {text: "Promotion"}),
    promo ? h("p", {}, `${promo.ref}: `, badge(promo.state), promo.waiting ? ` — ${promo.waiting}` : "")
      : h("p", {class: "muted", text: "no promotion yet"}),
    stateMachine(promo ? promo.state : null),
    h("div", {class: "actions"},
      h("label", {}, "version ", pick),
      act("Start promotion", "", "Start a promotion of the chosen version?",
          () => api("POST", "/admin/promotions", {version: `${name}@v${pick.value}`})),
      active ? act("Promote one step", "secondary", `Promote ${promo.ref} one step (gates skipped)?`,
                   () => api("POST", `/admin/promotions/${q}/promote`, {reason: `console: ${me.name}`})) : null,
      active ? act("Promote to stable", "secondary", `Promote ${promo.ref} to stable now?`,
                   () => api("POST", `/admin/promotions/${q}/promote`, {to: "stable", reason: `console: ${me.name}`})) : null,
      promo && promo.state !== "rejected" && promo.state !== "rolled_back"
        ? act("Roll back", "danger", `Roll back ${promo.ref}?`,
              () => api("POST", `/admin/promotions/${q}/rollback`, {reason: `console: ${me.name}`})) : null),
    h("div", {class: "actions"},
      h("label", {}, "alias ", alias),
      act("Set alias to chosen version", "secondary", "Move this alias to the chosen version?",
          () => api("PUT", `/admin/adapters/${q}/aliases/${encodeURIComponent(alias.value)}`,
                    {version: Number(pick.value), reason: `console: ${me.name}`}))),
    h("h2", {text: "Quality over time (per version and kind)"}),
    lineChart(Object.entries(byVersion).map(([k, pts]) => ({name: k, points: pts})),
              {title: "quality score", yMin: 0, yMax: 1,
               xFmt: x => new Date(x * 1000).toLocaleTimeString()}),
    promo ? h("h2", {text: "Promotion events"}) : null,
    promo ? table(["at", "from", "to", "actor", "reason"], promo.events.map(e => [
      e.at, e.from_state || "–", e.to_state, e.actor, e.reason])) : null);
}

async function traffic() {
  clearInterval(timer);
  const form = h("form", {class: "inline", id: "traffic-filter"},
    h("label", {}, "model", h("input", {name: "model", placeholder: "NAME or NAME@vN", size: 14})),
    h("label", {}, "lane", h("select", {name: "lane"}, ["", "stable", "canary", "shadow", "pinned", "base"]
      .map(l => h("option", {value: l, text: l || "any"})))),
    h("label", {}, "labelled", h("select", {name: "labelled"}, [["", "any"], ["yes", "yes"], ["no", "no"]]
      .map(([v, t]) => h("option", {value: v, text: t})))),
    h("label", {}, "since", h("input", {name: "since", type: "datetime-local"})),
    h("button", {type: "submit", text: "Filter"}));
  const list = h("div", {});
  const detail = h("div", {id: "sample-detail"});
  const exp = h("p", {class: "actions"});
  view(h("h1", {text: "Sampled traffic"}), form, exp, list, detail);
  const load = async () => {
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) p.set(k, k === "since" ? new Date(v).toISOString() : v);
    const model = p.get("model");
    put(exp, model ? h("span", {}, "export labelled samples of ", h("code", {text: model}), ": ",
      h("a", {href: `/console/api/traffic/export?model=${encodeURIComponent(model)}&kind=training`, text: "training file"}), " · ",
      h("a", {href: `/console/api/traffic/export?model=${encodeURIComponent(model)}&kind=golden`, text: "golden file"}))
      : h("span", {class: "muted", text: "filter by a model to export its labelled samples"}));
    try {
      const data = await api("GET", `/console/api/traffic?${p}`);
      put(list, table(["time", "model", "lane", "status", "latency ms", "prompt", "label"],
        data.data.map(r => [new Date(r.created_at).toLocaleTimeString(), r.ref, r.lane, r.status,
                            fmt(r.latency_ms, 0), r.prompt.slice(0, 80), r.label || r.corrected_output || "–"]),
        i => sample(data.data[i].id, detail)));
    } catch (e) { put(list, failure(e)); }
  };
  form.addEventListener("submit", e => { e.preventDefault(); load(); });
  load();
}

async function sample(id, box) {
  const r = await api("GET", `/console/api/traffic/${id}`);
  const label = h("input", {id: "label-input", value: r.label || "", "aria-label": "label", maxlength: 200});
  const corr = h("textarea", {id: "correct-input", rows: 3, cols: 40, "aria-label": "corrected answer"},
                 r.corrected_output || "");
  const note = h("p", {role: "status"});
  put(box, h("h2", {text: `Sample ${r.request_id}`}),
    h("p", {class: "muted", text: `${r.ref} · lane ${r.lane} · ${fmt(r.latency_ms, 0)} ms · trace ${r.trace_id || "–"}`}),
    h("h3", {text: "Prompt"}), h("pre", {text: r.prompt}),
    h("h3", {text: "Answer"}), h("pre", {text: r.output}),
    r.feedback_by ? h("p", {class: "muted", text: `feedback by ${r.feedback_by} at ${r.feedback_at}`}) : null,
    h("form", {class: "inline", onsubmit: async e => {
      e.preventDefault();
      const body = {};
      if (label.value) body.label = label.value;
      if (corr.value) body.corrected_output = corr.value;
      try { await api("POST", `/console/api/traffic/${id}/feedback`, body);
            put(note, h("span", {class: "ok", text: "saved"})); }
      catch (err) { put(note, failure(err)); }
    }}, h("label", {}, "label", label), h("label", {}, "corrected answer", corr),
        h("button", {type: "submit", id: "save-label", text: "Save label"})), note);
  label.focus();
}

async function keys() {
  clearInterval(timer);
  const [list, usage] = await Promise.all([api("GET", "/admin/keys"), api("GET", "/console/api/usage")]);
  const shown = h("div", {id: "new-key"});
  const form = h("form", {class: "inline", id: "key-form"},
    h("label", {}, "name", h("input", {name: "name", required: true, maxlength: 200})),
    h("label", {}, "scope", h("select", {name: "scope"}, h("option", {value: "user", text: "user"}),
                                h("option", {value: "admin", text: "admin"}))),
    h("label", {}, "models (comma-separated; empty: all)", h("input", {name: "models"})),
    h("label", {}, "rpm", h("input", {name: "rpm", type: "number", min: 1, size: 6})),
    h("label", {}, "tpm", h("input", {name: "tpm", type: "number", min: 1, size: 8})),
    h("label", {}, "sample rate", h("input", {name: "sample_rate", type: "number", min: 0, max: 1, step: "0.01", size: 5})),
    h("button", {type: "submit", text: "Create key"}));
  form.addEventListener("submit", async e => {
    e.preventDefault();
    const f = new FormData(form);
    const body = {name: f.get("name"), scope: f.get("scope")};
    if (f.get("models")) body.models = String(f.get("models")).split(",").map(x => x.trim()).filter(Boolean);
    for (const k of ["rpm", "tpm"]) if (f.get(k)) body[k] = Number(f.get(k));
    if (f.get("sample_rate")) body.sample_rate = Number(f.get("sample_rate"));
    try {
      const k = await api("POST", "/admin/keys", body);
      await keys();
      put(document.getElementById("new-key"), 
        h("p", {}, `Key ${k.id} created. Its secret is shown once:`),
        h("p", {class: "secret", id: "secret", text: k.key}));
    } catch (err) { put(shown, failure(err)); }
  });
  view(h("h1", {text: "API keys"}), form, shown,
    table(["id", "name", "scope", "models", "rpm / tpm", "sample rate", "sampled (24 h)", "state", ""],
      list.data.map(k => [k.id, k.name, k.scope, k.models ? k.models.join(", ") : "all",
        `${k.rpm || "–"} / ${k.tpm || "–"}`, fmt(k.sample_rate, 2), usage.data[k.id] || 0,
        k.revoked_at ? badge("revoked") : badge("active"),
        k.revoked_at || k.id === me.id ? "" : h("button", {type: "button", class: "danger",
          text: "Revoke", "data-key": k.id, onclick: async () => {
            if (!confirmed(`Revoke ${k.id} (${k.name})?`)) return;
            await api("DELETE", `/admin/keys/${k.id}`); keys();
          }})])));
}

async function route() {
  if (!csrf) return;
  const parts = location.hash.replace(/^#\//, "").split("/").map(decodeURIComponent);
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle(
    "active", a.getAttribute("href") === `#/${parts[0]}`));
  try {
    if (parts[0] === "jobs" && parts[1]) await job(parts[1]);
    else if (parts[0] === "jobs") await jobs();
    else if (parts[0] === "models" && parts[1]) await model(parts[1]);
    else if (parts[0] === "models") await models();
    else if (parts[0] === "traffic") await traffic();
    else if (parts[0] === "keys") await keys();
    else await overview();
  } catch (e) { if (csrf) view(failure(e)); }
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin-form").addEventListener("submit", signIn);
  document.getElementById("signout").addEventListener("click", signOut);
  resume();
});
