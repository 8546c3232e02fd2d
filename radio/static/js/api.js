/* The radio's JSON API, as the page uses it (see radio/api.py for the server side). */

export const stationUrl = (id) => `/api/stations/${encodeURIComponent(id)}`;

/** GET a JSON document; throws on HTTP errors and network failures. */
export async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

/**
 * POST a new prompt. Resolves to {ok, status, body, retryAfter}: body is the server's JSON
 * (202: {prompt, heard_in_seconds, ...}; 4xx: {error}), retryAfter the seconds of a 429.
 * Rejects only when the radio cannot be reached.
 */
export async function sendPrompt(id, prompt) {
  const r = await fetch(`${stationUrl(id)}/prompt`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify({ prompt }),
  });
  const body = await r.json().catch(() => ({}));
  const retryAfter = Number.parseInt(r.headers.get("Retry-After") || "", 10);
  return { ok: r.ok, status: r.status, body, retryAfter: retryAfter > 0 ? retryAfter : 0 };
}
