// backer's page: devices, live activity, files with history and restore, pause/resume.
// Every name shown comes from other devices: it is only ever set as text, never as HTML.
"use strict";

const state = {
  csrf: null, share: null, shares: [], dir: "", selected: null,
  source: null, ended: false, stale: false,
};
const $ = (id) => document.getElementById(id);
const FEED_MAX = 200;
const EVENT_TYPES = [
  "local-change", "remote-applied", "device-connected", "device-disconnected",
  "transfer-progress", "device-state", "conflict-appeared", "conflict-resolved", "scan-started", "scan-finished", "paused", "resumed",
  "error", "missed",
];

// The session's CSRF token arrives once, in the fragment of the login redirect, and is
// kept per tab in sessionStorage (per origin, port included): every API call carries it,
// because the cookie alone also reaches any other server on this host.
function csrfToken() {
  const given = new URLSearchParams(location.hash.slice(1)).get("csrf");
  if (given) {
    sessionStorage.setItem("backer-csrf", given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("backer-csrf");
}

const SESSION_ENDED = "Session ended: run 'backer open' again.";

async function api(path, options = {}) {
  const headers = { "X-CSRF-Token": state.csrf || "" };
  if (options.method && options.method !== "GET") headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (response.status === 401) {
    sessionEnded();
    throw new Error(SESSION_ENDED);
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// The node no longer knows this tab's session (it was ended, or expired): nothing on
// the page works until 'backer open' logs the browser in again, so say that, once.
function sessionEnded() {
  state.ended = true;
  if (state.source) state.source.close();
  const live = $("live");
  live.textContent = "session ended";
  live.className = "badge bad";
  notice(SESSION_ENDED);
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function sharePath(name) {
  return `/api/shares/${encodeURIComponent(name)}`;
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

// Every time on the page is shown one way: local time and how long ago ("14:03, 3 min
// ago"), the exact UTC time in the tooltip; the "ago" parts are kept current.
function ago(ms) {
  const seconds = Math.max(0, (Date.now() - ms) / 1000);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  const days = Math.floor(seconds / 86400);
  return days === 1 ? "yesterday" : `${days} days ago`;
}

function localTime(ms) {
  const date = new Date(ms), now = new Date();
  const clock = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (date.toDateString() === now.toDateString()) return clock;
  const day = { day: "numeric", month: "short" };
  if (date.getFullYear() !== now.getFullYear()) day.year = "numeric";
  return `${date.toLocaleDateString([], day)} ${clock}`;
}

function when(ms, never = "never") {
  const node = el("time", never, "when-text");
  if (!ms) return node;
  node.dataset.ms = ms;
  node.dateTime = new Date(ms).toISOString();
  node.title = node.dateTime;
  node.textContent = `${localTime(ms)}, ${ago(ms)}`;
  return node;
}

function refreshTimes() {
  for (const node of document.querySelectorAll("time[data-ms]")) {
    const ms = Number(node.dataset.ms);
    node.textContent = `${localTime(ms)}, ${ago(ms)}`;
  }
}

function rate(bytes) {
  return `${size(Math.round(bytes))}/s`;
}

// -- shares and devices ----------------------------------------------------------------

async function loadShares() {
  state.shares = await api("/api/shares");
  const select = $("share");
  select.replaceChildren(...state.shares.map((s) => el("option", s.name)));
  select.hidden = state.shares.length < 2;
  if (!state.shares.length) {
    notice("This device serves no share yet: 'backer init' or 'backer join' makes one.");
    return;
  }
  if (!state.shares.some((s) => s.name === state.share)) state.share = state.shares[0].name;
  select.value = state.share;
  renderShare();
}

function current() {
  return state.shares.find((s) => s.name === state.share);
}

function renderShare() {
  const share = current();
  if (!share) return;
  $("pause").textContent = share.paused ? "Resume" : "Pause";
  const others = share.devices.filter((d) => !d.this);
  const badge = $("state");
  if (share.paused) {
    badge.textContent = "paused"; badge.className = "badge warn";
  } else if (missing(share)) {
    badge.textContent = notHere(share); badge.className = "badge warn";
  } else if (others.length && others.every((d) => d.in_sync)) {
    badge.textContent = "in sync"; badge.className = "badge ok";
  } else if (others.some((d) => d.connected)) {
    badge.textContent = "syncing"; badge.className = "badge warn";
  } else {
    badge.textContent = others.length ? "offline" : "only this device"; badge.className = "badge";
  }
  const busy = share.devices.some((d) => d.rate_in || d.rate_out || (d.this && d.need_files));
  if (!share.paused && (busy || others.some((d) => d.connected && !d.in_sync))) refreshSoon(1500);
  const ordered = [...share.devices].sort((a, b) => b.this - a.this);
  $("devices").replaceChildren(...ordered.map((device) => deviceItem(device, share)));
}

// files the share lists that this device holds nowhere and is not fetching now
function missing(share) {
  const here = share.devices.find((d) => d.this);
  return share.not_here && share.not_here.files && !(here && here.need_files) ? share.not_here.files : 0;
}

function notHere(share) {
  const count = missing(share);
  return `${count} listed ${count === 1 ? "file" : "files"} not here`;
}

function needs(device) {
  const files = device.need_files === 1 ? "file" : "files";
  return `needs ${device.need_files} ${files}, ${size(device.need_bytes)}`;
}

// (what to say, data-status) of one device at a glance
function deviceState(device, share) {
  const needing = device.need_files || device.need_bytes;
  if (device.this && needing) return [needs(device), "needs"];
  if (device.this) return missing(share) ? [notHere(share), "needs"] : ["up to date", "up-to-date"];
  if (!device.connected) return ["offline", "offline"];
  if (device.in_sync) return ["in sync", "in-sync"];
  if (needing) return [needs(device), "needs"];
  return ["syncing", "connected"];
}

function deviceItem(device, share) {
  const item = el("li");
  item.dataset.device = device.id;
  const name = el("div", null, "device-name");
  name.append(el("span", null, device.connected || device.this ? "dot on" : "dot"));
  name.append(device.name || device.id.slice(0, 7));
  if (device.this) name.append(" ", el("span", "this device", "badge"));
  item.append(name);
  const [status, kind] = deviceState(device, share);
  const meta = el("div", null, "device-meta device-state");
  meta.dataset.status = kind;
  meta.append(el("span", status, { "in-sync": "badge ok", "up-to-date": "badge ok", needs: "badge warn" }[kind] || "badge"));
  if (device.rate_in || device.rate_out) {
    meta.append(el("span", `↓ ${rate(device.rate_in)} · ↑ ${rate(device.rate_out)}`, "rate"));
  }
  if (!device.this && !device.connected) {
    const seen = el("span", "last seen ");
    seen.append(when(device.last_seen_ms));
    meta.append(seen);
  }
  item.append(meta);
  const transfer = device.transfer;
  if (transfer && transfer.bytes_total && (transfer.bytes_done || device.rate_in || device.rate_out)) {
    const bar = el("progress");
    bar.max = transfer.bytes_total;
    bar.value = transfer.bytes_done;
    bar.title = `${transfer.files_done} of ${transfer.files_total} files, ${size(transfer.bytes_done)} of ${size(transfer.bytes_total)}`;
    item.append(bar);
  }
  item.append(el("div", [device.id.slice(0, 15), device.address].filter(Boolean).join(" · "), "device-meta"));
  return item;
}

// -- files and history ------------------------------------------------------------------

async function loadFiles() {
  if (!state.share) return;
  let listing;
  try {
    const deleted = $("show-deleted").checked ? "&deleted=1" : "";
    listing = await api(`${sharePath(state.share)}/files?path=${encodeURIComponent(state.dir)}${deleted}`);
  } catch (error) {
    if (state.dir) { state.dir = ""; return loadFiles(); }
    throw error;
  }
  renderCrumbs();
  const rows = listing.entries
    .sort((a, b) => (b.kind === "directory") - (a.kind === "directory") || a.name.localeCompare(b.name))
    .map(fileRow);
  if (!rows.length) {
    const empty = el("tr");
    const cell = el("td", "Nothing here yet.");
    cell.colSpan = 3;
    empty.append(cell);
    rows.push(empty);
  }
  $("files").tBodies[0].replaceChildren(...rows);
}

function renderCrumbs() {
  const crumbs = $("crumbs");
  const parts = state.dir ? state.dir.split("/") : [];
  const top = el("a", state.share);
  top.addEventListener("click", () => openDir(""));
  crumbs.replaceChildren(top);
  parts.forEach((part, index) => {
    const link = el("a", part);
    const target = parts.slice(0, index + 1).join("/");
    link.addEventListener("click", () => openDir(target));
    crumbs.append(" / ", link);
  });
}

function fileRow(entry) {
  const row = el("tr");
  row.dataset.path = entry.path;
  row.classList.toggle("selected", entry.path === state.selected);
  row.classList.toggle("deleted", entry.deleted);
  const live = entry.versions[0] || {};
  const name = el("td");
  const link = el("a", entry.kind === "directory" ? `${entry.name}/` : entry.name);
  if (live.kind === "symlink") link.textContent = `${entry.name} → ${live.target}`;
  link.addEventListener("click", () => (entry.kind === "directory" ? openDir(entry.path) : openHistory(entry.path)));
  name.append(link);
  if (live.kind === "symlink") name.append(" ", el("span", "link", "badge"));
  if (entry.deleted) name.append(" ", el("span", "deleted", "badge"));
  if (entry.conflict) name.append(" ", el("span", "conflict", "badge bad"));
  const changed = el("td", null, "when");
  changed.append(when(live.time_ms, ""));
  row.append(name, el("td", live.kind === "file" ? size(live.size) : "", "num"), changed);
  return row;
}

function openDir(path) {
  state.dir = path;
  state.selected = null;
  $("history").hidden = true;
  loadFiles().catch((e) => notice(e.message));
}

async function openHistory(path) {
  state.selected = path;
  const versions = await api(`${sharePath(state.share)}/history?path=${encodeURIComponent(path)}`);
  $("history-path").textContent = path;
  $("versions").replaceChildren(...versions.slice().reverse().map((v) => versionItem(path, v)));
  $("history").hidden = false;
  for (const row of $("files").tBodies[0].rows) row.classList.toggle("selected", row.dataset.path === path);
}

function versionItem(path, version) {
  const item = el("li");
  item.dataset.version = version.version;
  const what = version.kind === "file" ? size(version.size) : version.kind;
  const meta = el("span", null, "meta");
  meta.append(when(version.time_ms), ` · ${what} · ${version.device_name || version.device.slice(0, 7)}`);
  item.append(meta);
  if (version.live && version.kind === "deleted") {
    item.append(el("span", "deleted", "badge"));
  } else if (version.live) {
    item.append(el("span", "current", "badge ok"));
  } else if (version.bytes === "nowhere") {
    item.append(el("span", "bytes on no device", "badge"));
  } else if (version.kind === "file" || version.kind === "symlink") {
    const button = el("button", "Restore");
    button.type = "button";
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api(`${sharePath(state.share)}/restore`, {
          method: "POST", body: JSON.stringify({ path, version: version.version }),
        });
        notice("");
        await openHistory(path);
        await loadFiles();
      } catch (error) {
        notice(`Could not restore: ${error.message}`);
        button.disabled = false;
      }
    });
    item.append(button);
  }
  return item;
}

// -- conflicts --------------------------------------------------------------------------

async function loadConflicts() {
  if (!state.share) return;
  const found = await api(`${sharePath(state.share)}/conflicts`);
  $("conflicts").replaceChildren(...found.map(conflictItem));
  $("conflicts-panel").hidden = !found.length;
}

function conflictItem(conflict) {
  const item = el("li");
  item.dataset.path = conflict.path;
  const title = el("div", null, "conflict-path");
  title.append(el("span", conflict.path));
  const both = el("button", "Keep all");
  both.type = "button";
  both.addEventListener("click", () => resolve(both, { path: conflict.path, keep_both: true }));
  title.append(both);
  item.append(title);
  const list = el("ul", null, "contenders");
  for (const version of conflict.versions) {
    const row = el("li");
    row.dataset.version = version.version;
    const where = version.copy ? `copy: ${version.copy}` : "in place";
    const what = version.kind === "file" ? size(version.size) : version.kind;
    const meta = el("span", null, "meta");
    meta.append(when(version.modified_ms), ` · ${what} · ${version.device_name} (${version.device}) · ${where}`);
    row.append(meta);
    const keep = el("button", "Keep this", "primary");
    keep.type = "button";
    keep.addEventListener("click", () => resolve(keep, { path: conflict.path, keep: version.version }));
    row.append(keep);
    list.append(row);
  }
  item.append(list);
  return item;
}

async function resolve(button, choice) {
  button.disabled = true;
  try {
    await api(`${sharePath(state.share)}/resolve`, { method: "POST", body: JSON.stringify(choice) });
    notice("");
    await loadConflicts();
    await loadFiles();
  } catch (error) {
    notice(`Could not resolve: ${error.message}`);
    button.disabled = false;
  }
}

// -- live activity ----------------------------------------------------------------------

function who(event) {
  const short = event.device.slice(0, 7);
  return event.name ? `${event.name} (${short})` : short;
}

function describe(event) {
  const named = event.paths || [];
  const paths = named.join(", ");
  const more = named.length && event.count > named.length ? ` (+${event.count - named.length} more)` : "";
  switch (event.type) {
    case "local-change": return `Recorded here: ${event.change} ${paths}${more}`;
    case "remote-applied": return `From another device: ${event.change} ${paths}${more}`;
    case "device-connected": return `Connected: ${who(event)}`;
    case "device-disconnected": return `Disconnected: ${who(event)}: ${event.reason}`;
    case "conflict-appeared": return `${event.count} conflict(s): every version kept, the others as conflict copies`;
    case "conflict-resolved": return `Conflict resolved: ${event.path}`;
    case "paused": return "Paused: no exchange with other devices";
    case "resumed": return "Resumed";
    case "error": return `${event.warning ? "Warning" : "Problem"}: ${event.path ? `${event.path}: ` : ""}${event.reason}`;
    case "missed": return "Some activity happened while this page was away; the lists are reloaded.";
    default: return null;
  }
}

function addToFeed(event) {
  const text = describe(event);
  if (!text) return;
  const item = el("li");
  item.dataset.type = event.type;
  item.append(when(event.time_ms), el("span", text, event.type === "error" && !event.warning ? "what error" : "what"));
  const feed = $("feed");
  feed.prepend(item);
  while (feed.children.length > FEED_MAX) feed.lastChild.remove();
}

// What the feed shows before the page heard anything live: the share's latest changes
// from its journal (the live events then go above them), again for another share.
const RECENT = 20;

async function loadRecent() {
  if (!state.share) return;
  const page = await api(`${sharePath(state.share)}/changes?limit=${RECENT}`);
  const here = (current()?.devices || []).find((d) => d.this)?.id;
  const items = page.changes.filter((e) => e.changes.length).map((e) => {
    const paths = e.changes.slice(0, 3).map((c) => `${c.change} ${c.path}`).join(", ");
    const more = e.changes.length > 3 || e.skipped ? " and more" : "";
    const by = e.device === here ? "Recorded here" : `From ${e.device_name || e.device.slice(0, 7)}`;
    const item = el("li", null, "past");
    item.append(when(e.time_ms), el("span", `${by}: ${paths}${more}`, "what"));
    return item;
  });
  const feed = $("feed");
  for (const old of feed.querySelectorAll("li.past")) old.remove();
  feed.append(...items);
}

let refreshTimer = null;
function refreshSoon(delay = 150) {
  // (while a device catches up, its state changes without an event: look again soon)
  // At most one refresh waits: a steady stream of events must not put it off for ever.
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    loadShares().then(loadFiles).then(loadConflicts).catch((e) => notice(e.message));
    if (state.selected) openHistory(state.selected).catch(() => {});
  }, delay);
}

function showProgress(event) {
  const busy = event.files_total > event.files_done;
  $("transfer").hidden = !busy;
  $("transfer-bar").max = Math.max(event.bytes_total, 1);
  $("transfer-bar").value = event.bytes_done;
  const rate = event.rate ? `, ${size(event.rate)}/s` : "";
  $("transfer-text").textContent = `${event.files_done} of ${event.files_total} files, ${size(event.bytes_done)} of ${size(event.bytes_total)}${rate}`;
}

function listen(lastId) {
  const query = new URLSearchParams({ csrf: state.csrf || "" });
  if (lastId) query.set("since", lastId);
  const source = new EventSource(`/api/events?${query}`);
  state.source = source;
  const live = $("live");
  let last = lastId;
  source.onopen = () => {
    live.textContent = "live"; live.className = "badge ok";
    if (state.stale) { state.stale = false; notice(""); refreshSoon(); }
  };
  source.onerror = () => {
    if (state.ended) return;
    live.textContent = "reconnecting"; live.className = "badge warn";
    state.stale = true;
    // The browser retries by itself while the node is away, but gives up for good
    // on an answer that is not a stream (401 from a node that forgot the session):
    // then ask why, and listen again unless the session is gone.
    if (source.readyState !== EventSource.CLOSED) return;
    setTimeout(() => {
      api("/api/shares").then(() => listen(last)).catch(() => {
        if (!state.ended) setTimeout(() => listen(last), 2000);
      });
    }, 1000);
  };
  for (const type of EVENT_TYPES) {
    source.addEventListener(type, (message) => {
      const event = JSON.parse(message.data);
      last = message.lastEventId || last;
      if (event.type === "transfer-progress") {
        if (event.share === state.share) showProgress(event);
        return;
      }
      addToFeed(event);
      if (event.type !== "scan-started") refreshSoon();
    });
  }
}

// -- actions ----------------------------------------------------------------------------

function qrCode(rows) {
  // one path of unit squares, with the 4-module quiet zone a reader needs
  const svgNS = "http://www.w3.org/2000/svg";
  const size = rows.length + 8;
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${size} ${size}`);
  svg.setAttribute("shape-rendering", "crispEdges");
  let d = "";
  rows.forEach((row, y) => {
    for (let x = 0; x < row.length; x += 1) if (row[x] === "1") d += `M${x + 4},${y + 4}h1v1h-1z`;
  });
  const path = document.createElementNS(svgNS, "path");
  path.setAttribute("d", d);
  path.setAttribute("fill", "#000");
  svg.append(path);
  return svg;
}

async function act(path, done) {
  try {
    const answer = await api(`${sharePath(state.share)}/${path}`, { method: "POST" });
    notice("");
    if (done) done(answer);
    await loadShares();
  } catch (error) {
    notice(error.message);
  }
}

async function start() {
  try {
    state.csrf = csrfToken();
    if (!state.csrf) throw new Error("Open this page with 'backer open' (it logs this tab in).");
    await loadShares();
    await loadFiles();
    await loadConflicts();
    await loadRecent();
  } catch (error) {
    notice(`${error.message}`);
  }
  listen();
  $("share").addEventListener("change", () => {
    state.share = $("share").value;
    openDir("");
    loadConflicts().catch((e) => notice(e.message));
    loadRecent().catch((e) => notice(e.message));
    renderShare();
  });
  $("show-deleted").addEventListener("change", () => loadFiles().catch((e) => notice(e.message)));
  $("pause").addEventListener("click", () => act(current().paused ? "resume" : "pause"));
  $("rescan").addEventListener("click", () => act("scan"));
  $("invite").addEventListener("click", () => act("invite", (answer) => {
    $("token").value = answer.token;
    $("qr").replaceChildren(qrCode(answer.qr));
    $("invitation").hidden = false;
  }));
  $("copy").addEventListener("click", async () => {
    $("token").select();
    try { await navigator.clipboard.writeText($("token").value); } catch { document.execCommand("copy"); }
    $("copy").textContent = "Copied";
  });
  setInterval(() => { if (!document.hidden) loadShares().catch(() => {}); }, 30000);
  setInterval(refreshTimes, 30000);
}

start();
