// The console ("Calls" view, #live): live and past calls in one list, search, filters,
// paging, and a call's page.
// - The list is GET /v1/calls (newest first, `limit`/`offset`; with `q`, search results with a
//   snippet whose matches come in <mark>). WS /v1/events keeps it current: a call that starts
//   appears on the first page of the unfiltered list, and every listed row follows its call's
//   status and latest words.
// - A call's page: WS /v1/calls/{id}/events is opened first and its messages held, then what
//   was said before comes from GET /v1/calls/{id}/transcript?format=json; the held and later
//   messages are applied on top without duplicates (a word already stored is skipped; a segment
//   replaces the lines of its leg that it covers). Legs interleaved or side by side, each line
//   with its time in the leg's audio; words under LOW_CONFIDENCE marked; redaction placeholders
//   ([CARD_NUMBER], ...) styled as redacted; downloads in the four export formats.
// The page's address keeps the view (#live, #live/CALL_ID), so a reload shows the same call.

import { apiBase, apiKey, authHeaders, setApiKey, withKey } from "./key.js";

// Below this a word is marked: the measured wrong-word rate there is 57 % (README, Confidence).
const LOW_CONFIDENCE = 0.5;
const PAGE_SIZE = 20;
const PLACEHOLDER = /^\[([A-Z_]+)\]/; // a redacted span (telephony/redaction), e.g. "[SSN]."

const $ = (id) => document.getElementById(id);
const ui = {
  micView: $("mic-view"), liveView: $("live-view"), tabMic: $("tab-mic"), tabLive: $("tab-live"),
  status: $("live-status"), count: $("live-count"), calls: $("calls"), summary: $("list-summary"),
  search: $("search"), searchForm: $("search-form"), frontEnd: $("filter-front-end"),
  statusFilter: $("filter-status"), since: $("filter-since"), until: $("filter-until"),
  clear: $("filter-clear"), prev: $("page-prev"), next: $("page-next"), pageInfo: $("page-info"),
  keyForm: $("key-form"), keyInput: $("key-input"), keyWhy: $("key-why"),
  detail: $("call-detail"), title: $("detail-title"), meta: $("detail-meta"),
  tools: $("detail-tools"), layout: $("layout-toggle"), links: $("detail-links"),
  legend: $("detail-legend"), transcript: $("detail-transcript"),
};

class KeyNeeded extends Error {}

let base = null; // { ws, http }
let feed = null; // the /v1/events socket
let retryMs = 500;
let feedOpened = false; // the feed has been open before: a later open is a reconnection
const rows = new Map(); // call id → <li>, reused while the call is on screen
const query = { q: "", offset: 0 };
const page = { offset: 0, total: 0, exact: true }; // as last listed
let listing = 0; // the latest list request: an older answer arriving late is dropped
let follow = null; // the open call page (see openCall)

// --- the API ------------------------------------------------------------------------------

async function api(path) {
  base ||= await apiBase();
  const response = await fetch(`${base.http}${path}`, { headers: authHeaders() });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({}));
    askForKey(response.status === 401 ? "a key is needed" : `this key may not read calls (${body.reason || 403})`);
    throw new KeyNeeded(String(response.status));
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.reason || `${response.status} ${response.statusText}`);
  }
  return response;
}

function askForKey(why) {
  ui.keyForm.hidden = false;
  ui.keyWhy.textContent = why;
  setStatus("error", `Refused: ${why}. Type an API key (or open the page with ?key=KEY).`);
  ui.keyInput.focus();
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey(ui.keyInput.value.trim());
  ui.keyInput.value = "";
  ui.keyForm.hidden = true;
  if (feed) feed.close(1000);
  else watch();
  loadList();
  const open = follow && follow.callId;
  follow = null;
  if (open) openCall(open);
});

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function fail(error) {
  if (!(error instanceof KeyNeeded)) setStatus("error", error.message);
}

// --- small formatting helpers ---------------------------------------------------------------

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  const s = (seconds % 60).toFixed(1).padStart(4, "0");
  return `${m}:${s}`;
}

function duration(call) {
  if (!call.started_at) return "";
  const end = call.ended_at || Date.now() / 1000;
  const s = Math.max(0, Math.round(end - call.started_at));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function unescapeHtml(text) {
  return text.replaceAll("&lt;", "<").replaceAll("&gt;", ">").replaceAll("&amp;", "&");
}

// The search snippet: HTML-escaped text with matches in <mark>; built as nodes, never as HTML.
function snippetNodes(snippet) {
  const nodes = [];
  snippet.split(/(<mark>.*?<\/mark>)/).forEach((part) => {
    if (part.startsWith("<mark>")) nodes.push(el("mark", "", unescapeHtml(part.slice(6, -7))));
    else if (part) nodes.push(document.createTextNode(unescapeHtml(part)));
  });
  return nodes;
}

// --- the list -------------------------------------------------------------------------------

function row(callId) {
  let li = rows.get(callId);
  if (li) return li;
  li = el("li", "call");
  li.dataset.callId = callId;
  li.dataset.status = "live";
  li.tabIndex = 0;
  li.setAttribute("role", "button");
  for (const name of ["id", "front-end", "state", "duration", "labels", "snippet", "last"]) {
    li.append(el("span", name));
  }
  li.querySelector(".id").textContent = callId;
  li.addEventListener("click", () => openCall(callId));
  li.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") openCall(callId);
  });
  rows.set(callId, li);
  return li;
}

// The row of the call whose page is open: aria-current (a row is a button, not an option).
function markOpen(callId = follow && follow.callId) {
  for (const li of rows.values()) {
    if (li.dataset.callId === callId) li.setAttribute("aria-current", "true");
    else li.removeAttribute("aria-current");
  }
}

function fillRow(li, call) {
  li.call = { ...(li.call || {}), ...call };
  const c = li.call;
  li.dataset.status = c.status;
  li.querySelector(".front-end").textContent = c.front_end || "";
  li.querySelector(".state").textContent = c.status === "live" ? "live" : `${c.status}${c.reason ? ` (${c.reason})` : ""}`;
  li.querySelector(".duration").textContent = duration(c);
  li.querySelector(".duration").title = c.started_at ? `started ${new Date(c.started_at * 1000).toLocaleString()}` : "";
  const labels = Object.entries(c.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  li.querySelector(".labels").textContent = labels;
  li.setAttribute("aria-label", `call ${li.dataset.callId}, ${c.front_end || ""}, ${li.querySelector(".state").textContent}`);
  const snippet = li.querySelector(".snippet");
  if (c.match) {
    snippet.replaceChildren(el("span", "leg", `${c.match.leg}: `), ...snippetNodes(c.match.snippet));
  } else {
    snippet.replaceChildren();
  }
}

function updateCount() {
  const live = [...rows.values()].filter((r) => r.isConnected && r.dataset.status === "live").length;
  ui.count.textContent = `(${live} live)`;
}

function listParams() {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(query.offset) });
  if (query.q) params.set("q", query.q);
  if (ui.frontEnd.value) params.set("front_end", ui.frontEnd.value);
  if (ui.statusFilter.value) params.set("status", ui.statusFilter.value);
  // Dates are the viewer's local days: from the start of "From" to the end of "To".
  if (ui.since.value) params.set("since", String(new Date(`${ui.since.value}T00:00:00`).getTime() / 1000));
  if (ui.until.value) params.set("until", String(new Date(`${ui.until.value}T23:59:59.999`).getTime() / 1000));
  return params;
}

// The unfiltered first page is where a call that just started belongs.
function showsNewCalls() {
  return !query.q && !query.offset && !ui.frontEnd.value && !ui.since.value && !ui.until.value &&
    (!ui.statusFilter.value || ui.statusFilter.value === "live");
}

async function loadList() {
  const mine = ++listing;
  ui.calls.setAttribute("aria-busy", "true");
  const response = await api(`/v1/calls?${listParams()}`);
  const body = await response.json();
  if (mine !== listing) return;
  const shown = body.calls.map((call) => {
    const li = row(call.id);
    fillRow(li, { ...call, match: call.match || null });
    return li;
  });
  if (showsNewCalls()) {
    // Calls the feed announced that the store has not listed yet go on top.
    const listed = new Set(body.calls.map((c) => c.id));
    for (const li of rows.values()) {
      if (li.dataset.status === "live" && li.call && !listed.has(li.dataset.callId)) shown.unshift(li);
    }
  }
  ui.calls.replaceChildren(...shown);
  for (const [id, li] of rows) if (!li.isConnected && !(follow && follow.callId === id)) rows.delete(id);
  ui.calls.removeAttribute("aria-busy");
  page.offset = body.offset;
  page.total = body.total + (shown.length - body.calls.length);
  page.exact = body.total_exact !== false;
  showPage();
  ui.prev.disabled = body.offset === 0;
  ui.next.disabled = body.next_offset === undefined;
  ui.summary.textContent = query.q
    ? `${body.total}${body.total_exact === false ? "+" : ""} call${body.total === 1 ? "" : "s"} with “${query.q}”`
    : "";
  markOpen();
  updateCount();
}

// "1–20 of 43": what the list shows; a call the feed adds to the first page counts too.
function showPage() {
  const shown = ui.calls.children.length;
  const more = page.exact ? "" : "+"; // a search that stopped counting
  ui.pageInfo.textContent = `${page.total ? page.offset + 1 : 0}–${page.offset + shown} of ${page.total}${more}`;
}

function reload(resetPage = true) {
  if (resetPage) query.offset = 0;
  loadList().catch(fail);
}

ui.searchForm.addEventListener("submit", (event) => {
  event.preventDefault(); // Enter searches; the results replace the list
  query.q = ui.search.value.trim();
  reload();
});
for (const control of [ui.frontEnd, ui.statusFilter, ui.since, ui.until]) {
  control.addEventListener("change", () => reload());
}
ui.clear.addEventListener("click", () => {
  ui.search.value = "";
  query.q = "";
  for (const control of [ui.frontEnd, ui.statusFilter, ui.since, ui.until]) control.value = "";
  reload();
});
ui.prev.addEventListener("click", () => {
  query.offset = Math.max(0, query.offset - PAGE_SIZE);
  reload(false);
});
ui.next.addEventListener("click", () => {
  query.offset += PAGE_SIZE;
  reload(false);
});

// --- the live feed ----------------------------------------------------------------------------

function onFeed(message) {
  const callId = message.call_id;
  if (!callId) return;
  if (follow && follow.callId === callId && message.type === "call_ended") follow.call.ended_at = message.at;
  let li = rows.get(callId);
  if (!li && message.type === "call_started" && showsNewCalls()) {
    li = row(callId);
    ui.calls.prepend(li);
    page.total += 1;
    showPage();
  }
  if (!li) return;
  switch (message.type) {
    case "call_started":
      fillRow(li, {
        id: callId, front_end: message.front_end, status: "live", started_at: message.at,
        ended_at: null, labels: message.labels, legs: message.legs,
      });
      li.title = `legs: ${message.legs.join(", ")}`;
      break;
    case "word": {
      const last = li.querySelector(".last");
      const words = last.dataset.words ? last.dataset.words.split(" ") : [];
      words.push(message.text);
      const tail = words.slice(-12);
      last.dataset.words = tail.join(" ");
      last.textContent = `${message.leg}: ${tail.join(" ")}`;
      break;
    }
    case "call_ended":
      fillRow(li, { status: "ended", reason: message.reason, ended_at: message.at });
      break;
  }
  updateCount();
}

async function watch() {
  if (feed) return;
  base ||= await apiBase();
  setStatus("connecting", `Connecting to ${base.ws}/v1/events`);
  const socket = new WebSocket(withKey(`${base.ws}/v1/events`));
  feed = socket;
  socket.onopen = () => {
    retryMs = 500;
    setStatus("watching", "Watching every call");
    // Back after a break: calls may have ended unseen meanwhile; the store knows.
    if (feedOpened) reload(false);
    feedOpened = true;
  };
  socket.onmessage = (event) => onFeed(JSON.parse(event.data));
  socket.onclose = (event) => {
    feed = null;
    if (event.code === 1008) {
      askForKey(event.reason || "a key is needed");
      return;
    }
    setStatus("error", `Disconnected (${event.code}); retrying`);
    setTimeout(watch, retryMs);
    retryMs = Math.min(10000, retryMs * 2);
  };
}

// Ticks the duration of live calls.
setInterval(() => {
  for (const li of rows.values()) {
    if (li.isConnected && li.dataset.status === "live" && li.call) {
      li.querySelector(".duration").textContent = duration(li.call);
    }
  }
}, 1000);

// --- a call's page ---------------------------------------------------------------------------

function tokenNode(text, confidence) {
  const placeholder = PLACEHOLDER.exec(text);
  if (placeholder) {
    const span = el("span", "word redacted", text);
    span.title = `redacted: ${placeholder[1].toLowerCase().replaceAll("_", " ")}`;
    return span;
  }
  const span = el("span", "word", text);
  if (typeof confidence === "number") {
    span.dataset.confidence = String(confidence);
    if (confidence < LOW_CONFIDENCE) {
      span.classList.add("low");
      span.title = `confidence ${confidence.toFixed(2)}`;
    }
  }
  return span;
}

// tokens: [{text, confidence?}]
function lineNode(leg, start, end, tokens, partial) {
  const p = el("p", partial ? "line partial" : "line");
  p.dataset.leg = leg;
  p.dataset.start = String(start);
  p.dataset.end = String(end);
  const time = el("time", "", clock(start));
  time.title = `${start.toFixed(2)} s into the ${leg} leg`;
  const body = el("span", "text");
  tokens.forEach((token, i) => {
    if (i) body.append(" ");
    body.append(tokenNode(token.text, token.confidence));
  });
  p.append(time, el("span", "leg", leg), body);
  place(p, leg);
  return p;
}

function place(p, leg) {
  if (!follow.legs.includes(leg)) follow.legs.push(leg);
  p.style.gridColumn = String(follow.legs.indexOf(leg) + 1);
  ui.transcript.style.setProperty("--legs", String(follow.legs.length));
}

// A stored line's words: those of its leg within its time span, when they spell its text
// (the segment's own words); otherwise its text alone, without confidence.
function storedTokens(line, words) {
  const mine = words.filter((w) => w.leg === line.leg && w.start >= line.start - 1e-6 && w.end <= line.end + 1e-6);
  const spelled = mine.map((w) => w.text).join(" ").split(/\s+/).join(" ");
  if (mine.length && spelled === line.text.trim().split(/\s+/).join(" ")) return mine;
  return line.text.trim().split(/\s+/).filter(Boolean).map((text) => ({ text }));
}

function wordKey(leg, w) {
  return `${leg}|${w.start}|${w.text}`;
}

function showPartial(leg) {
  const words = follow.pending[leg] || [];
  const old = follow.partials[leg];
  delete follow.partials[leg];
  if (!words.length) {
    if (old) old.remove();
    return;
  }
  const fresh = lineNode(leg, words[0].start ?? 0, words[words.length - 1].end ?? 0, words, true);
  if (old) old.replaceWith(fresh);
  else ui.transcript.append(fresh);
  follow.partials[leg] = fresh;
}

function finishLine(leg, start, end, tokens) {
  // A segment replaces the lines of its leg it covers: a stored utterance's words shown as a
  // line before the segment came, or the same segment already stored.
  const covered = [...ui.transcript.querySelectorAll(".line:not(.partial)")].filter(
    (p) => p.dataset.leg === leg && Number(p.dataset.start) >= start - 1e-6 && Number(p.dataset.end) <= end + 1e-6,
  );
  const line = lineNode(leg, start, end, tokens, false);
  const partial = follow.partials[leg];
  if (covered.length) {
    covered[0].replaceWith(line);
    covered.slice(1).forEach((p) => p.remove());
    if (partial) partial.remove();
  } else if (partial) {
    partial.replaceWith(line);
  } else {
    ui.transcript.append(line);
  }
  delete follow.partials[leg];
  follow.pending[leg] = [];
}

function onCallEvent(message) {
  const leg = message.leg;
  switch (message.type) {
    case "call_started":
      follow.call = { ...follow.call, front_end: message.front_end, legs: message.legs, labels: message.labels, status: "live" };
      showMeta();
      break;
    case "partial": // the utterance still being spoken: greyed, replaced as it grows
      follow.pending[leg] = message.text.split(" ").filter(Boolean).map((text) => ({ text, start: message.start, end: message.end }));
      showPartial(leg);
      break;
    case "word":
      if (follow.seen.has(wordKey(leg, message))) return; // stored already, shown already
      follow.seen.add(wordKey(leg, message));
      (follow.pending[leg] ||= []).push(message);
      showPartial(leg);
      break;
    case "segment":
      finishLine(leg, message.start, message.end, message.words.length ? message.words : [{ text: message.text }]);
      break;
    case "closed":
      if ((follow.pending[leg] || []).length) {
        const words = follow.pending[leg];
        finishLine(leg, words[0].start ?? 0, words[words.length - 1].end ?? 0, words);
      }
      break;
    case "call_ended":
      for (const [name, words] of Object.entries(follow.pending)) {
        if (words.length) finishLine(name, words[0].start ?? 0, words[words.length - 1].end ?? 0, words);
      }
      follow.call = { ...follow.call, status: "ended", reason: message.reason, ended_at: message.at };
      ended();
      break;
  }
}

function showMeta() {
  const c = follow.call;
  const labels = Object.entries(c.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  const when = c.started_at ? new Date(c.started_at * 1000).toLocaleString() : "";
  const parts = [c.front_end, when, c.status === "live" ? "live" : `${c.status} · ${duration(c)}`];
  parts.push(`legs: ${(c.legs || []).join(", ")}`);
  if ((c.redaction || []).length) parts.push(`redacted: ${c.redaction.join(", ")}`);
  if (labels) parts.push(labels);
  ui.meta.textContent = parts.filter(Boolean).join(" · ");
}

function ended() {
  follow.socket.close(1000);
  ui.detail.dataset.state = "ended";
  ui.title.textContent = `Call ${follow.callId} (${follow.call.status}${follow.call.reason ? `: ${follow.call.reason}` : ""})`;
  showMeta();
}

async function download(format) {
  const callId = follow.callId;
  const response = await api(`/v1/calls/${encodeURIComponent(callId)}/transcript?format=${format}`);
  const url = URL.createObjectURL(await response.blob());
  const a = el("a");
  a.href = url;
  a.download = `${callId}.${format}`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function openCall(callId) {
  if (follow && follow.callId === callId) return;
  if (follow) follow.socket.close(1000);
  if (decodeURIComponent(location.hash.slice(6)) !== callId) history.pushState(null, "", `#live/${encodeURIComponent(callId)}`);
  markOpen(callId);
  ui.transcript.replaceChildren();
  ui.meta.textContent = "";
  ui.detail.dataset.state = "connecting";
  ui.detail.dataset.callId = callId;
  ui.title.textContent = `Call ${callId}`;
  ui.tools.hidden = false;
  ui.legend.hidden = false;
  base ||= await apiBase();
  const id = encodeURIComponent(callId);
  // Subscribe first, hold what comes, then read the past: nothing said in between is lost.
  const socket = new WebSocket(withKey(`${base.ws}/v1/calls/${id}/events`));
  const mine = { callId, socket, call: {}, legs: [], pending: {}, partials: {}, seen: new Set(), held: [], loaded: false };
  follow = mine;
  const opened = new Promise((resolve) => {
    socket.onopen = () => resolve(true);
    socket.onerror = () => resolve(false);
  });
  socket.onmessage = (event) => {
    if (follow !== mine) return;
    const message = JSON.parse(event.data);
    if (mine.loaded) onCallEvent(message);
    else mine.held.push(message);
  };
  socket.onclose = (event) => {
    if (follow !== mine || ui.detail.dataset.state === "ended") return;
    if (event.code === 1008) askForKey(event.reason || "a key is needed");
    ui.detail.dataset.state = "closed";
    ui.title.textContent = `Call ${callId} (live stream closed: ${event.reason || event.code})`;
  };
  let stored;
  try {
    stored = await (await api(`/v1/calls/${id}/transcript?format=json`)).json();
  } catch (error) {
    if (follow !== mine) return;
    socket.close(1000);
    ui.detail.dataset.state = "error";
    ui.title.textContent = `Call ${callId}: ${error instanceof KeyNeeded ? "refused" : error.message}`;
    return;
  }
  if (follow !== mine) return;
  mine.call = stored.call;
  for (const leg of stored.call.legs || []) if (!mine.legs.includes(leg)) mine.legs.push(leg);
  for (const w of stored.words) mine.seen.add(wordKey(w.leg, w));
  for (const line of stored.segments) {
    ui.transcript.append(lineNode(line.leg, line.start, line.end, storedTokens(line, stored.words), false));
  }
  showMeta();
  mine.loaded = true;
  for (const message of mine.held.splice(0)) onCallEvent(message);
  if (mine.call.status !== "live") {
    ended();
    return;
  }
  const live = await opened;
  if (follow !== mine || ui.detail.dataset.state === "ended") return;
  if (live) {
    ui.detail.dataset.state = "following";
    ui.title.textContent = `Call ${callId} (live, following since ${new Date().toLocaleTimeString()})`;
  }
}

ui.layout.addEventListener("click", () => {
  const columns = ui.layout.getAttribute("aria-pressed") !== "true";
  ui.layout.setAttribute("aria-pressed", String(columns));
  ui.transcript.dataset.layout = columns ? "columns" : "interleaved";
});

for (const format of ["json", "txt", "vtt", "srt"]) {
  const button = el("button", "download", format);
  button.type = "button";
  button.dataset.format = format;
  button.setAttribute("aria-label", `Download transcript as ${format}`);
  button.addEventListener("click", () => download(format).catch(fail));
  ui.links.append(" ", button);
}

// --- views ---------------------------------------------------------------------------------

let started = false;

function route() {
  const live = location.hash.startsWith("#live");
  ui.liveView.hidden = !live;
  ui.micView.hidden = live;
  const [current, other] = live ? [ui.tabLive, ui.tabMic] : [ui.tabMic, ui.tabLive];
  current.setAttribute("aria-current", "page");
  other.removeAttribute("aria-current");
  if (!live) return;
  if (!started) {
    started = true;
    watch().catch(fail);
    reload();
  }
  const callId = location.hash.startsWith("#live/") ? decodeURIComponent(location.hash.slice(6)) : "";
  if (callId) openCall(callId);
}

window.addEventListener("hashchange", route);
window.addEventListener("popstate", route);
if (apiKey()) ui.keyForm.hidden = true;
route();
