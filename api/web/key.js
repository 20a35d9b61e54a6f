// The API key the page uses when the server has `[api] keys`: from the page's URL
// (`?key=KEY`, or the older `?token=KEY`) or typed once into the console's key box, kept in
// sessionStorage for this tab only (a closed tab forgets it). The key is taken out of the
// address bar at once, so a copied link or a screenshot does not carry it.
// HTTP requests send it as `Authorization: Bearer KEY`; WebSockets cannot set headers and the
// event routes answer no subprotocol, so they carry it as `?token=KEY` (api/auth.py).

const STORAGE = "stt-bridge-key";

function fromUrl() {
  const params = new URLSearchParams(location.search);
  const key = params.get("key") || params.get("token");
  if (!key) return;
  sessionStorage.setItem(STORAGE, key);
  params.delete("key");
  params.delete("token");
  const query = params.toString();
  history.replaceState(history.state, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
}

fromUrl();

export function apiKey() {
  return sessionStorage.getItem(STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(STORAGE, key);
  else sessionStorage.removeItem(STORAGE);
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export function withKey(url) {
  const key = apiKey();
  if (!key) return url;
  const u = new URL(url);
  u.searchParams.set("token", key);
  return u.toString();
}

// Where the API is: the audio/API port (config.json), or `server.websocket_url`'s host behind
// a proxy. The page itself may be on the web port: then the API is another origin, and the
// server answers the console's reads with CORS headers for this page's origin only.
export async function apiBase() {
  const config = await (await fetch("/config.json")).json();
  if (config.websocket_url) {
    const url = new URL(config.websocket_url);
    return { ws: `${url.protocol}//${url.host}`, http: `${url.protocol === "wss:" ? "https" : "http"}://${url.host}` };
  }
  const secure = location.protocol === "https:";
  const host = `${location.hostname}:${config.port}`;
  return { ws: `${secure ? "wss" : "ws"}://${host}`, http: `${secure ? "https" : "http"}://${host}` };
}
