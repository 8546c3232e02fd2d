/* The station's programme on the page: the blend as weight bars, who chose it and since when,
 * a transition in progress, what comes next, today's schedule (the current slot marked), and
 * the listeners' queue with vote buttons and the skip tally.
 *
 * `programme` is the station's `programme` object (GET /api/stations/{id}, SSE `programme`):
 * {playing, transition, next, slot, pinned, listener_prompts, queue, skip, today}.
 */

const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

export const SOURCES = {
  config: "the station's own prompt",
  schedule: "the schedule",
  rotation: "the rotation",
  listener: "a listener",
  vote: "the listeners' vote",
  admin: "the admin",
  clip: "an uploaded clip",
};

const WHY = {
  slot: "the next slot",
  rotation: "the rotation",
  queue: "the queue",
  hold_end: "the end of the listeners' pick",
  pin_end: "the end of the pin",
  prompt_end: "the programme",
};

/** "07:20" for Unix seconds. */
export const hhmm = (unix) => clock.format(new Date(unix * 1000));

/** <li> bars of a blend [{text, weight}] (nothing for a single text). */
export function blendBars(list, blend) {
  const parts = Array.isArray(blend) ? blend : [];
  list.hidden = parts.length < 2;
  list.replaceChildren(
    ...(parts.length < 2 ? [] : parts).map((p) => {
      const li = document.createElement("li");
      const pct = Math.round(p.weight * 100);
      const text = document.createElement("span");
      text.className = "b-text";
      text.textContent = p.text;
      const bar = document.createElement("span");
      bar.className = "b-bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.style.width = `${pct}%`;
      bar.append(fill);
      const num = document.createElement("span");
      num.className = "b-pct";
      num.textContent = `${pct}%`;
      li.append(text, bar, num);
      return li;
    }),
  );
}

/** "the rotation" for a source name. */
export const sourceText = (source) => SOURCES[source] || source || "";

/** The sentence about the next change, or "" when nothing is planned. */
export function nextText(next) {
  if (!next) return "";
  const what = next.text ? `“${next.text}”` : "the most-voted suggestion";
  return `Next at ${hhmm(next.at)}: ${what} (${WHY[next.why] || next.why})`;
}

/** Progress in [0, 1) of a transition now, from the programme's playing change; null: none. */
export function transitionProgress(playing, transition, receivedAt) {
  if (!transition || !playing || !(playing.transition_seconds > 0)) return null;
  const p = transition.progress + (Date.now() - receivedAt) / 1000 / playing.transition_seconds;
  return p < 1 ? Math.max(0, p) : null;
}

/** <li> items of today's slots. */
export function todayItems(today) {
  return today.map((slot) => {
    const li = document.createElement("li");
    if (slot.current) {
      li.className = "current";
      li.setAttribute("aria-current", "true");
    }
    const time = document.createElement("span");
    time.className = "t-time";
    const end = slot.end === "00:00" ? "24:00" : slot.end; // midnight ends the day
    time.textContent = `${slot.start}–${end || "…"}`;
    const name = document.createElement("span");
    name.className = "t-name";
    name.textContent = slot.name || "slot";
    const prompts = document.createElement("span");
    prompts.className = "t-prompts";
    prompts.textContent = slot.prompts.join(" · ");
    li.append(time, name, prompts);
    if (slot.current) {
      const now = document.createElement("span");
      now.className = "t-now";
      now.textContent = "now";
      li.append(now);
    }
    return li;
  });
}

/** <li> items of the queue, each with a vote button calling onVote(suggestion, button), and
 * with `onRemove` (the admin's) a remove button calling onRemove(suggestion, button). */
export function queueItems(queue, onVote, onRemove = null) {
  return queue.map((s) => {
    const li = document.createElement("li");
    li.dataset.id = String(s.id);
    const text = document.createElement("span");
    text.className = "q-text";
    text.textContent = s.text;
    const votes = document.createElement("span");
    votes.className = "q-votes";
    votes.textContent = `${s.votes} vote${s.votes === 1 ? "" : "s"}`;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "vote";
    button.textContent = "Vote";
    button.setAttribute("aria-label", `Vote for “${s.text}” (${votes.textContent})`);
    button.addEventListener("click", () => onVote(s, button));
    li.append(text, votes, button);
    if (onRemove) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "vote remove";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove “${s.text}”`);
      remove.addEventListener("click", () => onRemove(s, remove));
      li.append(remove);
    }
    return li;
  });
}

/** "1 of 2 skip votes" for the skip tally. */
export function skipText(skip) {
  if (!skip) return "";
  return `${skip.votes} of ${skip.needed} skip vote${skip.needed === 1 ? "" : "s"}`;
}
