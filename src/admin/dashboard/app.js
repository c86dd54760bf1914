// The keygate dashboard: a login form, then charts and tables drawn as SVG
// from the admin API on this origin (its only source; nothing else is
// fetched). Served from src/admin/dashboard/ by src/admin/dashboard.rs.
//
// The token lives in sessionStorage (this tab, until it closes or logs out),
// never in a URL, never in persistent storage, never in the console. Text
// from the API is put in the page with textContent only.
"use strict";

const TOKEN_KEY = "keygate.admin-token";
const SVG_NS = "http://www.w3.org/2000/svg";
const ANONYMOUS = "_anonymous";
// The ranges the switch offers: `since` and `by` of GET /admin/usage.
const RANGES = {
  hour: { since: "60m", by: "minute", title: "last hour, by minute (UTC)" },
  day: { since: "24h", by: "hour", title: "last day, by hour (UTC)" },
  month: { since: "30d", by: "day", title: "last 30 days, by day (UTC)" },
};
const STEP_MS = { minute: 60e3, hour: 3600e3, day: 86400e3 };
// Clients (or routes) drawn as their own series; the rest are added up as "other".
const SERIES = 5;
// Records asked for per page of a list (the admin API's default page size).
const PAGE_LIMIT = 100;
// Keys of one client whose credits left are read (one call each).
const MAX_CREDIT_LOOKUPS = 50;
// A bound on pages followed for one list, against a cursor that never ends.
const MAX_PAGES = 10000;

const state = {
  range: "hour",
  client: null,
  // Bumped by every render; an answer for an older one is dropped.
  generation: 0,
  // The token was just entered: a 401 means it is wrong, not that it changed.
  justLoggedIn: false,
};

const $ = (selector) => document.querySelector(selector);

// === The admin API ===

class Unauthorized extends Error {}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// GET `path` with the token; the JSON body, or an Unauthorized / ApiError.
async function api(path) {
  const bearer = token();
  if (!bearer) throw new Unauthorized("Log in with the admin token.");
  let response;
  try {
    response = await fetch(path, {
      headers: { Authorization: "Bearer " + bearer, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
  } catch (error) {
    throw new ApiError(0, "unreachable", "The admin API did not answer: " + error.message);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (response.status === 401) {
    throw new Unauthorized((body && body.message) || "unauthorized");
  }
  if (!response.ok) {
    const code = (body && body.error) || "http_" + response.status;
    const message = (body && body.message) || response.statusText;
    throw new ApiError(response.status, code, `${path}: ${message} (${response.status} ${code})`);
  }
  return body;
}

// A whole list from a paginated call: follows `next_cursor` until null,
// collecting `items`.
async function listAll(path) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < MAX_PAGES; page++) {
    let url = withParam(path, "limit", PAGE_LIMIT);
    if (cursor !== null) url = withParam(url, "cursor", cursor);
    const body = await api(url);
    items.push(...body.items);
    if (body.next_cursor === null || body.next_cursor === undefined) return items;
    cursor = body.next_cursor;
  }
  throw new ApiError(0, "too_many_pages", `${path}: more than ${MAX_PAGES} pages`);
}

function withParam(path, name, value) {
  return path + (path.includes("?") ? "&" : "?") + name + "=" + encodeURIComponent(value);
}

// The usage report, or null when the gateway keeps none (the file store: 501).
async function usageReport(range, client) {
  let path = `/admin/usage?since=${range.since}&by=${range.by}`;
  if (client) path = withParam(path, "client", client);
  try {
    return await api(path);
  } catch (error) {
    if (error instanceof ApiError && error.status === 501) return null;
    throw error;
  }
}

// A client's record (null without one) and its keys.
async function clientDetail(id) {
  if (id === ANONYMOUS) return { record: null, keys: [] };
  const record = api("/admin/clients/" + encodeURIComponent(id)).catch((error) => {
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  });
  const keys = await listAll(withParam("/admin/keys", "client", id));
  // A list gives a key's credit grant; what is left is in the key's own record.
  const credited = keys.filter((key) => key.credits).slice(0, MAX_CREDIT_LOOKUPS);
  const shown = await Promise.all(credited.map((key) => api("/admin/keys/" + encodeURIComponent(key.id))));
  shown.forEach((full, i) => {
    credited[i].credits = full.credits;
  });
  return { record: await record, keys };
}

// The client records. Without usage (the file store) also the clients that
// have keys but no record, which the report would otherwise name; with
// usage, reading every key on each render would cost more than it shows.
async function clientList(report) {
  const records = listAll("/admin/clients");
  const keys = report === null ? listAll("/admin/keys") : Promise.resolve([]);
  return { records: await records, keyClients: [...new Set((await keys).map((key) => key.client))] };
}

// === Login and the views ===

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.generation++;
  $("#app").hidden = true;
  $("#ranges").hidden = true;
  $("#session").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  const input = $("#token");
  input.value = "";
  input.focus();
}

function showApp() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#ranges").hidden = false;
  $("#session").hidden = false;
}

function onLogin(event) {
  event.preventDefault();
  const input = $("#token");
  const value = input.value.trim();
  input.value = "";
  if (!value) {
    $("#login-error").textContent = "Enter the admin token.";
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, value);
  $("#login-error").textContent = "";
  state.justLoggedIn = true;
  showApp();
  render();
}

function clientFromHash() {
  const match = /^#client=(.+)$/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch (_) {
    return null; // a hand-edited hash that is not percent-encoding: the overview
  }
}

function openClient(id) {
  location.hash = "client=" + encodeURIComponent(id);
}

async function render() {
  const generation = ++state.generation;
  const main = $("#app");
  const range = RANGES[state.range];
  const client = state.client;
  main.dataset.status = "loading";
  try {
    const report = await usageReport(range, client);
    const detail = client ? await clientDetail(client) : await clientList(report);
    if (generation !== state.generation) return;
    state.justLoggedIn = false;
    notice(null);
    $("#view-title").textContent = client ? "Client " + clientLabel(client) : "All clients";
    $("#range-title").textContent = range.title;
    $("#back").hidden = !client;
    $("#overview").hidden = !!client;
    $("#client").hidden = !client;
    $("#usage").hidden = report === null;
    if (report === null) {
      notice(
        "No usage to show: usage is kept in Redis, and this gateway runs on the file store " +
          "(GET /admin/usage answers 501). Clients and keys are listed below.",
      );
    } else {
      drawUsage(report);
    }
    if (client) {
      drawClient(client, detail, report);
    } else {
      drawOverview(detail, report);
    }
    main.dataset.usage = report === null ? "none" : "redis";
    main.dataset.view = client ? "client" : "overview";
    main.dataset.client = client || "";
    main.dataset.range = state.range;
    main.dataset.by = range.by;
    main.dataset.status = "ready";
  } catch (error) {
    if (generation !== state.generation) return;
    if (error instanceof Unauthorized) {
      showLogin(
        state.justLoggedIn
          ? "The admin API refused this token (401). Check the [admin] token of the gateway."
          : "The admin API refused the token (401): it may have changed. Log in again.",
      );
      state.justLoggedIn = false;
      return;
    }
    notice(error.message, true);
    main.dataset.status = "error";
  }
}

function notice(text, isError) {
  const box = $("#notice");
  box.hidden = !text;
  box.textContent = text || "";
  box.classList.toggle("error", !!isError);
}

// === Usage charts ===

function drawUsage(report) {
  const by = report.by;
  const starts = bucketStarts(report);
  const clients = report.clients;
  const sum = (pick) => seriesOf(clients, starts, by, pick);

  const perClient = busiest(
    clients.map((c) => c.client),
    clientLabel,
    (ids) => seriesOf(clients.filter((c) => ids.includes(c.client)), starts, by, (b) => b.requests),
    "clients",
  );
  barChart($("#chart-requests"), starts, by, perClient, count);

  barChart($("#chart-status"), starts, by, [
    { name: "2xx", label: "2xx", cls: "ok", values: sum((b) => b.status_2xx) },
    { name: "3xx", label: "3xx", cls: "redirect", values: sum((b) => b.status_3xx) },
    { name: "4xx", label: "4xx", cls: "client-error", values: sum((b) => b.status_4xx) },
    { name: "5xx", label: "5xx", cls: "server-error", values: sum((b) => b.status_5xx) },
  ], count);

  barChart($("#chart-refusals"), starts, by, [
    { name: "401", label: "401 no valid key", cls: "r401", values: sum((b) => b.refused_401) },
    { name: "403", label: "403 scope", cls: "r403", values: sum((b) => b.refused_403) },
    { name: "429_rate", label: "429 rate", cls: "r429", values: sum((b) => b.refused_429_rate) },
    { name: "429_quota", label: "429 quota", cls: "r429q", values: sum((b) => b.refused_429_quota) },
    { name: "429_credits", label: "429 credits", cls: "r429c", values: sum((b) => b.refused_429_credits) },
  ], count);

  lineChart($("#chart-bytes"), starts, by, [
    { name: "bytes_in", label: "in (request bodies)", cls: "s0", values: sum((b) => b.bytes_in) },
    { name: "bytes_out", label: "out (response bodies)", cls: "s1", values: sum((b) => b.bytes_out) },
  ], bytes);

  const upstream = sum((b) => b.upstream_requests);
  const latency = sum((b) => b.upstream_latency_us);
  const mean = latency.map((us, i) => (upstream[i] > 0 ? us / upstream[i] / 1000 : null));
  lineChart($("#chart-latency"), starts, by, [
    { name: "latency_ms", label: "mean per request that reached an upstream", cls: "s2", values: mean },
  ], millis);

  barChart($("#chart-credits"), starts, by, [
    { name: "credits", label: "credits spent by admitted requests", cls: "s3", values: sum((b) => b.credits) },
  ], count);

  // Routes over time, the busiest as their own series (as clients above).
  const routes = new Map();
  for (const c of clients) {
    for (const [route, counts] of Object.entries(c.routes)) {
      routes.set(route, (routes.get(route) || 0) + counts.requests);
    }
  }
  const perRoute = busiest(
    [...routes.keys()].sort((a, b) => routes.get(b) - routes.get(a) || a.localeCompare(b)),
    (route) => `${route} (${count(routes.get(route))})`,
    (names) => sum((b) => names.reduce((n, route) => n + (b.route_requests[route] || 0), 0)),
    "routes",
  );
  barChart($("#chart-routes"), starts, by, perRoute, count);

  drawTiles(report.totals);
}

// Series for `names` (busiest first): the first few their own, the rest
// added up as "other"; `valuesOf(names)` sums the values of some names.
function busiest(names, labelOf, valuesOf, what) {
  const own = names.length > SERIES + 1 ? SERIES : names.length;
  const series = names.slice(0, own).map((name, i) => ({
    name,
    label: labelOf(name),
    cls: "s" + i,
    values: valuesOf([name]),
  }));
  const rest = names.slice(own);
  if (rest.length > 0) {
    series.push({ name: "other", label: `${rest.length} other ${what}`, cls: "s5", values: valuesOf(rest) });
  }
  return series;
}

function drawTiles(totals) {
  const refused =
    totals.refused_401 + totals.refused_403 + totals.refused_429_rate +
    totals.refused_429_quota + totals.refused_429_credits;
  const latency = totals.upstream_requests > 0 ? totals.upstream_latency_us / totals.upstream_requests / 1000 : null;
  const tiles = [
    ["requests", "requests", totals.requests, count],
    ["status_2xx", "2xx", totals.status_2xx, count],
    ["status_4xx", "4xx", totals.status_4xx, count],
    ["status_5xx", "5xx", totals.status_5xx, count],
    ["refused", "refused (401/403/429)", refused, count],
    ["bytes_in", "bytes in", totals.bytes_in, bytes],
    ["bytes_out", "bytes out", totals.bytes_out, bytes],
    ["latency_ms", "mean upstream latency", latency, millis],
    ["credits", "credits spent", totals.credits, count],
  ];
  const box = $("#tiles");
  box.replaceChildren(
    ...tiles.map(([metric, label, value, format]) =>
      el("div", { class: "tile", "data-metric": metric, "data-value": value === null ? "" : String(value) },
        el("span", { class: "value" }, value === null ? "—" : format(value)),
        el("span", { class: "label" }, label)),
    ),
  );
}

// Every bucket start in the report's range (ms), so empty buckets show as gaps.
function bucketStarts(report) {
  const step = STEP_MS[report.by];
  const first = Date.parse(report.since);
  const last = Date.parse(report.until);
  const starts = [];
  for (let t = first; t <= last; t += step) starts.push(t);
  return starts;
}

// The sum over `clients` of `pick(bucket)`, one value per start.
function seriesOf(clients, starts, by, pick) {
  const values = starts.map(() => 0);
  const step = STEP_MS[by];
  for (const c of clients) {
    for (const bucket of c.buckets) {
      const i = Math.round((Date.parse(bucket.start) - starts[0]) / step);
      if (i >= 0 && i < values.length) values[i] += pick(bucket);
    }
  }
  return values;
}

// === Overview and client views ===

function drawOverview({ records, keyClients }, report) {
  const usage = new Map((report ? report.clients : []).map((c) => [c.client, c]));
  const top = (report ? report.clients : []).map((c) => ({
    name: c.client,
    label: clientLabel(c.client),
    value: c.totals.requests,
  }));
  if (report) hbarChart($("#chart-top"), top, count, openClient);
  $("#chart-top").hidden = !report;

  const byId = new Map(records.map((r) => [r.id, r]));
  const ids = [...new Set([...usage.keys(), ...byId.keys(), ...keyClients])].sort((a, b) => {
    const ra = usage.has(a) ? usage.get(a).totals.requests : -1;
    const rb = usage.has(b) ? usage.get(b).totals.requests : -1;
    return rb - ra || a.localeCompare(b);
  });
  const rows = ids.map((id) => {
    const record = byId.get(id);
    const used = usage.get(id);
    return el("tr", { "data-client": id },
      el("td", {}, el("button", { type: "button", class: "link", "data-client": id, onclick: () => openClient(id) },
        clientLabel(id))),
      el("td", {}, record ? record.status : id === ANONYMOUS ? "requests without a valid key" : "no record"),
      el("td", {}, (record && record.quota) || "—"),
      el("td", {}, record ? creditsText(record.credits) : "—"),
      el("td", { class: "num" }, used ? count(used.totals.requests) : report ? "0" : "—"),
    );
  });
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: "5" }, "No clients yet.")));
  $("#clients-table tbody").replaceChildren(...rows);
}

function drawClient(id, detail, report) {
  const { record, keys } = detail;
  const usage = report && report.clients.find((c) => c.client === id);
  const facts = record
    ? [
        ["Status", record.status],
        ["Label", record.label || "—"],
        ["Rate", record.rate ? record.rate + (record.burst ? `, burst ${record.burst}` : "") : "—"],
        ["Quota", record.quota || "—"],
        ["Credits", creditsText(record.credits)],
        ["Requests in range", usage ? count(usage.totals.requests) : "0"],
        ["Refused for quota in range", usage ? count(usage.totals.refused_429_quota) : "0"],
        ["Credits spent in range", usage ? count(usage.totals.credits) : "0"],
      ]
    : [
        ["Record", id === ANONYMOUS ? "requests without a valid key are counted here" : "no client record (keys only)"],
        ["Requests in range", usage ? count(usage.totals.requests) : "0"],
      ];
  $("#client-record").replaceChildren(
    ...facts.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]),
  );

  const rows = keys.map((key) => {
    const used = usage && usage.keys[key.id];
    return el("tr", { "data-key": key.id, "data-state": key.state },
      el("td", {}, el("code", {}, key.id)),
      el("td", {}, el("span", { class: "state " + key.state }, key.state)),
      el("td", {}, key.label || "—"),
      el("td", {}, key.rate ? key.rate + (key.burst ? `, burst ${key.burst}` : "") : "—"),
      el("td", {}, key.quota || "—"),
      el("td", {}, creditsText(key.credits)),
      el("td", { "data-last-used": key.last_used || "" }, key.last_used ? when(key.last_used) : "—"),
      el("td", { class: "num" }, used ? count(used.requests) : "0"),
    );
  });
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: "8" }, "No keys.")));
  $("#keys-table tbody").replaceChildren(...rows);
}

function creditsText(credits) {
  if (!credits) return "—";
  let text = `${count(credits.uses)} granted`;
  if (credits.remaining !== undefined) {
    text += credits.remaining === null ? ", left: unknown" : `, ${count(credits.remaining)} left`;
  }
  if (credits.refill) text += `, refill ${credits.refill}`;
  return text;
}

function clientLabel(id) {
  return id === ANONYMOUS ? "(no valid key)" : id;
}

// === SVG drawing ===

// Stacked bars, one per bucket; each segment carries its series, bucket
// start and value as data attributes.
function barChart(figure, starts, by, series, format) {
  const { svg, width, height, plot } = canvas(figure);
  const totals = starts.map((_, i) => series.reduce((s, x) => s + (x.values[i] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  grid(svg, plot, max, format);
  const slot = plot.w / starts.length;
  const barWidth = Math.max(1, slot * 0.78);
  starts.forEach((start, i) => {
    let y = plot.y + plot.h;
    for (const s of series) {
      const value = s.values[i] || 0;
      if (value <= 0) continue;
      const h = (value / max) * plot.h;
      y -= h;
      const bar = svgEl("rect", {
        x: (plot.x + i * slot + (slot - barWidth) / 2).toFixed(2),
        y: y.toFixed(2),
        width: barWidth.toFixed(2),
        height: Math.max(h, 0.5).toFixed(2),
        class: "bar " + s.cls,
        "data-series": s.name,
        "data-start": new Date(start).toISOString(),
        "data-value": String(value),
      });
      bar.appendChild(svgEl("title", {}, `${s.label} · ${timeLabel(start, by)} · ${format(value)}`));
      svg.appendChild(bar);
    }
  });
  timeAxis(svg, plot, starts, by);
  const total = totals.reduce((a, b) => a + b, 0);
  if (total === 0) empty(svg, width, height);
  figure.dataset.total = String(total);
  figure.dataset.buckets = String(starts.length);
  legend(figure, series);
}

// One line per series (gaps where a value is null), a dot per point.
function lineChart(figure, starts, by, series, format) {
  const { svg, width, height, plot } = canvas(figure);
  const all = series.flatMap((s) => s.values.filter((v) => v !== null));
  const max = niceMax(Math.max(0, ...all));
  grid(svg, plot, max, format);
  const slot = plot.w / starts.length;
  const x = (i) => plot.x + (i + 0.5) * slot;
  const y = (v) => plot.y + plot.h - (v / max) * plot.h;
  for (const s of series) {
    let d = "";
    let pen = false;
    s.values.forEach((value, i) => {
      if (value === null) {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${x(i).toFixed(2)},${y(value).toFixed(2)}`;
      pen = true;
    });
    if (d) svg.appendChild(svgEl("path", { d, class: "line " + s.cls }));
    s.values.forEach((value, i) => {
      if (value === null || value === 0) return;
      const dot = svgEl("circle", {
        cx: x(i).toFixed(2),
        cy: y(value).toFixed(2),
        r: "2.5",
        class: "dot " + s.cls,
        "data-series": s.name,
        "data-start": new Date(starts[i]).toISOString(),
        "data-value": String(value),
      });
      dot.appendChild(svgEl("title", {}, `${s.label} · ${timeLabel(starts[i], by)} · ${format(value)}`));
      svg.appendChild(dot);
    });
  }
  timeAxis(svg, plot, starts, by);
  if (all.every((v) => v === 0)) empty(svg, width, height);
  figure.dataset.buckets = String(starts.length);
  legend(figure, series);
}

// Horizontal bars, one row per item, largest first; `onPick(name)` makes
// the rows clickable.
function hbarChart(figure, rows, format, onPick) {
  const svg = figure.querySelector("svg");
  const width = 600;
  const rowHeight = 26;
  const height = Math.max(rowHeight * rows.length + 8, 40);
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const labelWidth = 170;
  const valueWidth = 80;
  const max = Math.max(1, ...rows.map((r) => r.value));
  rows.forEach((row, i) => {
    const y = 4 + i * rowHeight;
    const g = svgEl("g", { class: "row" + (onPick ? " pick" : ""), "data-name": row.name, "data-value": String(row.value) });
    g.appendChild(svgEl("text", { x: labelWidth - 8, y: y + rowHeight / 2 + 4, class: "label", "text-anchor": "end" },
      truncate(row.label, 24)));
    const w = ((width - labelWidth - valueWidth) * row.value) / max;
    g.appendChild(svgEl("rect", { x: labelWidth, y: y + 3, width: Math.max(w, 1).toFixed(2), height: rowHeight - 8, class: "bar s0" }));
    g.appendChild(svgEl("text", { x: labelWidth + w + 6, y: y + rowHeight / 2 + 4, class: "value" }, format(row.value)));
    g.appendChild(svgEl("title", {}, `${row.label}: ${format(row.value)}`));
    if (onPick) {
      g.setAttribute("tabindex", "0");
      g.setAttribute("role", "button");
      g.addEventListener("click", () => onPick(row.name));
      g.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") onPick(row.name);
      });
    }
    svg.appendChild(g);
  });
  if (rows.length === 0) empty(svg, width, height);
}

function canvas(figure) {
  const svg = figure.querySelector("svg");
  const width = figure.classList.contains("wide") ? 1200 : 600;
  const height = 220;
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const plot = { x: 56, y: 10, w: width - 56 - 10, h: height - 10 - 26 };
  return { svg, width, height, plot };
}

function grid(svg, plot, max, format) {
  for (const fraction of [0, 0.5, 1]) {
    const y = plot.y + plot.h - fraction * plot.h;
    svg.appendChild(svgEl("line", { x1: plot.x, x2: plot.x + plot.w, y1: y, y2: y, class: fraction ? "grid" : "axis" }));
    svg.appendChild(svgEl("text", { x: plot.x - 6, y: y + 4, class: "tick", "text-anchor": "end" }, format(max * fraction)));
  }
}

function timeAxis(svg, plot, starts, by) {
  const labels = Math.min(6, starts.length);
  for (let k = 0; k < labels; k++) {
    const i = labels === 1 ? 0 : Math.round((k * (starts.length - 1)) / (labels - 1));
    const x = plot.x + ((i + 0.5) * plot.w) / starts.length;
    svg.appendChild(svgEl("text", { x, y: plot.y + plot.h + 18, class: "tick", "text-anchor": "middle" },
      timeLabel(starts[i], by)));
  }
}

function empty(svg, width, height) {
  svg.appendChild(svgEl("text", { x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle" },
    "Nothing in this range"));
}

function legend(figure, series) {
  const list = figure.querySelector(".legend");
  if (!list) return;
  list.replaceChildren(...series.map((s) => el("li", { class: s.cls }, s.label)));
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// === Formatting ===

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * power >= value) return m * power;
  return 10 * power;
}

function count(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(n >= 1e5 ? 0 : 1) + "k";
  // Axis ticks halve the top of the scale: 0.5 must not print as 1.
  if (!Number.isInteger(n) && n < 100) return n.toFixed(1);
  return Math.round(n).toLocaleString("en-US");
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) {
    n /= 1024;
    u++;
  }
  return (u === 0 ? Math.round(n) : n.toFixed(n >= 10 ? 0 : 1)) + " " + units[u];
}

function millis(n) {
  return (n >= 10 ? n.toFixed(0) : n.toFixed(2)) + " ms";
}

function timeLabel(ms, by) {
  const iso = new Date(ms).toISOString();
  if (by === "minute") return iso.slice(11, 16);
  if (by === "hour") return iso.slice(5, 10) + " " + iso.slice(11, 13) + "h";
  return iso.slice(5, 10);
}

function when(iso) {
  return iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC");
}

function truncate(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

// === Wiring ===

function selectRange(name) {
  state.range = name;
  for (const button of document.querySelectorAll("#ranges button")) {
    button.setAttribute("aria-pressed", String(button.dataset.range === name));
  }
  render();
}

$("#login-form").addEventListener("submit", onLogin);
for (const button of document.querySelectorAll("#ranges button")) {
  button.addEventListener("click", () => selectRange(button.dataset.range));
}
$("#refresh").addEventListener("click", () => render());
$("#logout").addEventListener("click", () => showLogin("Logged out."));
$("#back").addEventListener("click", () => {
  history.pushState(null, "", location.pathname);
  state.client = null;
  render();
});
window.addEventListener("hashchange", () => {
  state.client = clientFromHash();
  render();
});

state.client = clientFromHash();
if (token()) {
  showApp();
  render();
} else {
  showLogin("");
}
