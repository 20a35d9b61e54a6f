// The "Live calls" view: every call the bridge is handling, whatever front end brought it.
// WS /v1/events feeds the list (a call_started for each call already live, then every event);
// picking a call opens WS /v1/calls/{id}/events and shows its transcript as it is spoken,
// each line labelled with its leg (caller, agent, callee). Both are on the audio/API port.

const $ = (id) => document.getElementById(id);
const ui = {
  micView: $("mic-view"), liveView: $("live-view"), tabMic: $("tab-mic"), tabLive: $("tab-live"),
  status: $("live-status"), count: $("live-count"), calls: $("calls"),
  detail: $("call-detail"), title: $("detail-title"), meta: $("detail-meta"),
  links: $("detail-links"), transcript: $("detail-transcript"),
};
const MAX_ENDED = 50; // finished calls kept in the list

let feed = null; // the /v1/events socket
let follow = null; // { callId, socket, pending: {leg: [words]}, partials: {leg: element} }
let retryMs = 500;
const rows = new Map(); // call id → <li>

async function apiBase() {
  const config = await (await fetch("/config.json")).json();
  if (config.websocket_url) {
    const url = new URL(config.websocket_url);
    return { ws: `${url.protocol}//${url.host}`, http: `${url.protocol === "wss:" ? "https" : "http"}://${url.host}` };
  }
  const secure = location.protocol === "https:";
  const host = `${location.hostname}:${config.port}`;
  return { ws: `${secure ? "wss" : "ws"}://${host}`, http: `${secure ? "https" : "http"}://${host}` };
}

function withToken(url) {
  const token = new URLSearchParams(location.search).get("token");
  if (!token) return url;
  const u = new URL(url);
  u.searchParams.set("token", token);
  return u.toString();
}

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function updateCount() {
  const live = [...rows.values()].filter((r) => r.dataset.status === "live").length;
  ui.count.textContent = `(${live} live)`;
}

function row(callId) {
  let li = rows.get(callId);
  if (li) return li;
  li = document.createElement("li");
  li.className = "call";
  li.dataset.callId = callId;
  li.dataset.status = "live";
  li.setAttribute("aria-selected", "false");
  for (const name of ["id", "front-end", "state", "last"]) {
    const span = document.createElement("span");
    span.className = name;
    li.append(span);
  }
  li.querySelector(".id").textContent = callId;
  li.querySelector(".state").textContent = "live";
  li.addEventListener("click", () => followCall(callId));
  rows.set(callId, li);
  ui.calls.prepend(li);
  return li;
}

function pruneEnded() {
  const ended = [...rows.values()].filter((r) => r.dataset.status === "ended");
  for (const li of ended.slice(MAX_ENDED)) {
    rows.delete(li.dataset.callId);
    li.remove();
  }
}

function onFeed(message) {
  const callId = message.call_id;
  if (!callId) return;
  const li = row(callId);
  switch (message.type) {
    case "call_started":
      li.querySelector(".front-end").textContent = message.front_end;
      li.title = `legs: ${message.legs.join(", ")}`;
      li.dataset.legs = message.legs.join(",");
      break;
    case "word":
    case "segment": {
      const last = li.querySelector(".last");
      const words = (last.dataset.words ? last.dataset.words.split(" ") : []);
      if (message.type === "word") words.push(message.text);
      const tail = words.slice(-12);
      last.dataset.words = tail.join(" ");
      last.textContent = `${message.leg}: ${tail.join(" ")}`;
      break;
    }
    case "call_ended":
      li.dataset.status = "ended";
      li.querySelector(".state").textContent = `ended (${message.reason})`;
      ui.calls.append(li); // finished calls go below the live ones
      pruneEnded();
      break;
  }
  updateCount();
}

async function watch() {
  if (feed) return;
  const base = await apiBase();
  const url = withToken(`${base.ws}/v1/events`);
  setStatus("connecting", `Connecting to ${base.ws}/v1/events`);
  feed = new WebSocket(url);
  feed.onopen = () => {
    retryMs = 500;
    setStatus("watching", "Watching every call");
  };
  feed.onmessage = (event) => onFeed(JSON.parse(event.data));
  feed.onclose = (event) => {
    feed = null;
    if (event.code === 1008) {
      setStatus("error", `Refused: ${event.reason || "policy violation"} (add ?token=KEY to the page URL)`);
      return;
    }
    setStatus("error", `Disconnected (${event.code}); retrying`);
    for (const li of [...rows.values()]) {
      if (li.dataset.status !== "live") continue; // the snapshot on reconnect brings them back
      li.remove();
      rows.delete(li.dataset.callId);
    }
    setTimeout(watch, retryMs);
    retryMs = Math.min(10000, retryMs * 2);
  };
}

function line(leg, text, partial) {
  const p = document.createElement("p");
  p.className = partial ? "line partial" : "line";
  p.dataset.leg = leg;
  const label = document.createElement("span");
  label.className = "leg";
  label.textContent = leg;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  p.append(label, body);
  return p;
}

function showPartial(leg) {
  const words = follow.pending[leg] || [];
  let el = follow.partials[leg];
  if (!words.length) {
    if (el) el.remove();
    delete follow.partials[leg];
    return;
  }
  if (!el) {
    el = line(leg, "", true);
    follow.partials[leg] = el;
    ui.transcript.append(el);
  }
  el.querySelector(".text").textContent = words.join(" ");
}

function finishLeg(leg, text) {
  // A segment (or, at the end, the words after the last segment) becomes a final line.
  const partial = follow.partials[leg];
  const final = line(leg, text, false);
  if (partial) partial.replaceWith(final);
  else ui.transcript.append(final);
  delete follow.partials[leg];
  follow.pending[leg] = [];
}

function onFollow(message) {
  const leg = message.leg;
  switch (message.type) {
    case "call_started":
      ui.meta.textContent = `${message.front_end} · legs: ${message.legs.join(", ")} · ` +
        Object.entries(message.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
      break;
    case "partial": // the utterance still being spoken: greyed, replaced as it grows
      follow.pending[leg] = message.text.split(" ");
      showPartial(leg);
      break;
    case "word":
      (follow.pending[leg] ||= []).push(message.text);
      showPartial(leg);
      break;
    case "segment":
      finishLeg(leg, message.text);
      break;
    case "closed":
      if ((follow.pending[leg] || []).length) finishLeg(leg, follow.pending[leg].join(" "));
      break;
    case "call_ended":
      for (const [name, words] of Object.entries(follow.pending)) {
        if (words.length) finishLeg(name, words.join(" "));
      }
      ui.detail.dataset.state = "ended";
      ui.title.textContent = `Call ${follow.callId} (ended: ${message.reason})`;
      break;
  }
}

async function followCall(callId) {
  if (follow && follow.callId === callId) return;
  if (follow) follow.socket.close(1000);
  for (const li of rows.values()) li.setAttribute("aria-selected", String(li.dataset.callId === callId));
  ui.transcript.replaceChildren();
  ui.meta.textContent = "";
  ui.detail.dataset.state = "connecting";
  ui.detail.dataset.callId = callId;
  ui.title.textContent = `Call ${callId}`;
  const base = await apiBase();
  const id = encodeURIComponent(callId);
  ui.links.replaceChildren("Transcript: ");
  for (const format of ["txt", "vtt", "srt", "json"]) {
    const a = document.createElement("a");
    a.href = withToken(`${base.http}/v1/calls/${id}/transcript?format=${format}`);
    a.textContent = format;
    a.target = "_blank";
    ui.links.append(a, " ");
  }
  const socket = new WebSocket(withToken(`${base.ws}/v1/calls/${id}/events`));
  follow = { callId, socket, pending: {}, partials: {} };
  const mine = follow;
  socket.onopen = () => {
    if (follow !== mine) return;
    ui.detail.dataset.state = "following";
    ui.title.textContent = `Call ${callId} (following since ${new Date().toLocaleTimeString()})`;
  };
  socket.onmessage = (event) => {
    if (follow === mine) onFollow(JSON.parse(event.data));
  };
  socket.onclose = (event) => {
    if (follow !== mine || ui.detail.dataset.state === "ended") return;
    ui.detail.dataset.state = "closed";
    ui.title.textContent = `Call ${callId} (stream closed: ${event.reason || event.code})`;
  };
}

function route() {
  const live = location.hash === "#live";
  ui.liveView.hidden = !live;
  ui.micView.hidden = live;
  const [current, other] = live ? [ui.tabLive, ui.tabMic] : [ui.tabMic, ui.tabLive];
  current.setAttribute("aria-current", "page");
  other.removeAttribute("aria-current");
  if (live) watch().catch((e) => setStatus("error", e.message));
}

window.addEventListener("hashchange", route);
route();
