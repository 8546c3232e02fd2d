/* The radio's JSON API, as the page uses it (see radio/api.py for the server side). */

export const stationUrl = (id) => `/api/stations/${encodeURIComponent(id)}`;

/** GET a JSON document; throws on HTTP errors and network failures. */
export async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

/**
 * POST a new prompt (a suggestion on a station in queue mode). Resolves to {ok, status, body, retryAfter}: body is the server's JSON
 * (202: {prompt, heard_in_seconds, ...}; 4xx: {error}), retryAfter the seconds of a 429.
 * Rejects only when the radio cannot be reached.
 */
export function sendPrompt(id, prompt) {
  return post(`${stationUrl(id)}/prompt`, { prompt });
}

/** Upvote suggestion `sid` of station `id` (same answer shape as sendPrompt). */
export function vote(id, sid) {
  return post(`${stationUrl(id)}/suggestions/${encodeURIComponent(sid)}/vote`);
}

/** A vote to skip what station `id` plays now. */
export function skip(id) {
  return post(`${stationUrl(id)}/skip`);
}

async function post(url, data) {
  const r = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: data === undefined ? undefined : JSON.stringify(data),
  });
  const body = await r.json().catch(() => ({}));
  const retryAfter = Number.parseInt(r.headers.get("Retry-After") || "", 10);
  return { ok: r.ok, status: r.status, body, retryAfter: retryAfter > 0 ? retryAfter : 0 };
}

/**
 * An admin request to `url` with `Authorization: Bearer <token>`: `json` is sent as JSON, `form`
 * (a FormData) as multipart/form-data. Same answer shape as sendPrompt; rejects only when the
 * radio cannot be reached. The token goes in the header only, never in the URL.
 */
export async function admin(method, url, token, { json, form } = {}) {
  const headers = { Accept: "application/json", Authorization: `Bearer ${headerBytes(token)}` };
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(url, {
    method,
    headers,
    body: json !== undefined ? JSON.stringify(json) : form,
    cache: "no-store",
  });
  const body = await r.json().catch(() => ({}));
  return { ok: r.ok, status: r.status, body };
}

/** A text as its UTF-8 bytes, one character per byte: what a header value may hold (fetch
 * sends each character as one byte, and refuses characters above U+00FF). The radio compares
 * the token's UTF-8 bytes, so a token like "café" works from the page as from curl. */
function headerBytes(text) {
  return String.fromCharCode(...new TextEncoder().encode(text));
}
