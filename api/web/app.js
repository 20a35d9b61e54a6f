// The browser client: microphone → 24 kHz int16 over a WebSocket → live transcript.
// Protocol: binary frames of raw int16 LE 24 kHz mono to "/"; JSON text frames back
// (partial, word, segment, end_of_turn, error, closed). A partial is the hypothesis of the
// utterance still being spoken: shown greyed, replaced by the next one or by its segment.
// Stop sends {"type":"stop"} and waits for "closed". The header's status line is this view's:
// it sits in the microphone view, so the console never shows "Disconnected" while it watches.

import { withKey } from "./key.js";

const SAMPLE_RATE = 24000;
const BATCH_SAMPLES = 1920; // 80 ms

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), connect: $("connect"), start: $("start"), stop: $("stop"),
  level: $("level"), transcript: $("transcript"), partial: $("partial"),
};

let socket = null;
let audio = null; // { context, source, node, stream }
let pendingWords = [];

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function setButtons({ connected, listening }) {
  ui.connect.textContent = connected ? "Disconnect" : "Connect";
  ui.start.disabled = !connected || listening;
  ui.stop.disabled = !connected || !listening;
}

async function socketUrl() {
  const config = await (await fetch("/config.json")).json();
  let url = config.websocket_url;
  if (!url) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    url = `${scheme}://${location.hostname}:${config.port}/`;
  }
  return withKey(url); // the API key (?key= in the page's URL, or typed in the console)
}

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  const s = (seconds % 60).toFixed(1).padStart(4, "0");
  return `${m}:${s}`;
}

function onMessage(event) {
  const message = JSON.parse(event.data);
  switch (message.type) {
    case "partial":
      pendingWords = [];
      ui.partial.textContent = message.text;
      break;
    case "word":
      pendingWords.push(message.text);
      ui.partial.textContent = pendingWords.join(" ");
      break;
    case "segment": {
      const line = document.createElement("p");
      line.className = "segment";
      const time = document.createElement("time");
      time.textContent = clock(message.start);
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = message.text;
      line.append(time, text);
      ui.transcript.append(line);
      pendingWords = [];
      ui.partial.textContent = "";
      break;
    }
    case "end_of_turn": {
      const mark = document.createElement("span");
      mark.className = "turn";
      ui.transcript.append(mark);
      break;
    }
    case "error":
      setStatus("error", `Server: ${message.message}`);
      break;
    case "closed":
      setStatus("closed", "Stream finished: every word is in");
      break;
  }
}

async function connect() {
  const url = await socketUrl();
  setStatus("connecting", `Connecting to ${url}`);
  socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    setStatus("connected", "Connected");
    setButtons({ connected: true, listening: false });
  };
  socket.onmessage = onMessage;
  socket.onclose = (event) => {
    const why = event.code === 1013 ? "server full, try again later" : event.reason || "closed";
    const finished = ui.status.dataset.state === "closed";
    if (!finished) setStatus(event.code === 1000 ? "disconnected" : "error", `Disconnected (${event.code}: ${why})`);
    socket = null;
    stopAudio();
    setButtons({ connected: false, listening: false });
  };
}

async function start() {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
  });
  const context = new AudioContext({ sampleRate: SAMPLE_RATE });
  await context.audioWorklet.addModule("/static/worklet.js");
  const source = context.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(context, "capture-processor", {
    processorOptions: { batchSamples: BATCH_SAMPLES },
  });
  node.port.onmessage = ({ data }) => {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(data.pcm);
    ui.level.style.width = `${Math.min(100, Math.round(data.peak * 140))}%`;
    ui.level.dataset.peak = String(Math.max(Number(ui.level.dataset.peak || 0), data.peak));
  };
  source.connect(node);
  audio = { context, source, node, stream };
  setStatus("listening", `Listening (${context.sampleRate} Hz)`);
  setButtons({ connected: true, listening: true });
}

function stopAudio() {
  if (!audio) return;
  audio.source.disconnect();
  audio.node.disconnect();
  audio.stream.getTracks().forEach((t) => t.stop());
  audio.context.close();
  audio = null;
  ui.level.style.width = "0";
}

function stop() {
  stopAudio();
  if (socket && socket.readyState === WebSocket.OPEN) {
    setStatus("flushing", "Finishing the last words…");
    socket.send(JSON.stringify({ type: "stop" }));
  }
  setButtons({ connected: !!socket, listening: false });
}

ui.connect.addEventListener("click", () => (socket ? socket.close(1000) : connect()));
ui.start.addEventListener("click", () => start().catch((e) => setStatus("error", `Microphone: ${e.message}`)));
ui.stop.addEventListener("click", stop);
