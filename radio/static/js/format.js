/* Words and numbers for the page: relative times ("3 minutes ago"), clock times, seconds. */

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const hhmm = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const full = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

/** "just now", "3 minutes ago", "2 hours ago" for an ISO time; "" when it is not one. */
export function ago(iso) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "";
  const s = Math.round((t - Date.now()) / 1000);
  if (s > -45) return "just now"; // also absorbs a client clock a little ahead of the server's
  const m = Math.round(s / 60);
  if (m > -60) return relative.format(m, "minute");
  const h = Math.round(m / 60);
  if (h > -24) return relative.format(h, "hour");
  return relative.format(Math.round(h / 24), "day");
}

/** Fill a <time> element: relative text, machine datetime, full local time as its tooltip. */
export function setTime(node, iso, withClock = false) {
  node.dateTime = iso || "";
  node.textContent = iso ? ago(iso) : "";
  const t = Date.parse(iso);
  node.title = Number.isNaN(t) ? "" : full.format(t);
  if (withClock && !Number.isNaN(t)) node.textContent += ` · ${hhmm.format(t)}`;
}

/** "4.2 s" for a finite number, "–" otherwise. */
export function seconds(x, digits = 1) {
  return typeof x === "number" && Number.isFinite(x) ? `${x.toFixed(digits)} s` : "–";
}
