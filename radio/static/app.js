/* Endless Radio web player: the page's entry module (no build step; ES modules in js/).
 *
 * Lists the stations (GET /api/stations), shows the chosen one's prompt (a blend as weight
 * bars), who chose it and since when, a transition, what comes next, today's programme, the
 * listeners' queue with vote buttons and a skip button (js/programme.js), its history,
 * listeners and generation health, keeps them live over Server-Sent Events (js/live.js), plays
 * it (js/player.js: hls.js, native HLS or MP3), draws the sound (js/picture.js) and sends new
 * prompts or suggestions (POST /api/stations/{id}/prompt), showing the server's answer: when
 * the prompt will be heard, where the suggestion stands, or why it was refused. With the admin
 * token entered (js/admin.js): the schedule editor, clip upload, pin, and the queue's removals.
 *
 * URL flags: `?station=ID` picks a station, `?player=hls|native|mp3` forces a player.
 */

import { AdminPanel } from "./js/admin.js";
import { getJSON, sendPrompt, skip, stationUrl, vote } from "./js/api.js";
import { seconds, setTime } from "./js/format.js";
import { LiveEvents } from "./js/live.js";
import { SoundPicture } from "./js/picture.js";
import { Player } from "./js/player.js";
import {
  blendBars,
  hhmm,
  nextText,
  queueItems,
  skipText,
  sourceText,
  todayItems,
  transitionProgress,
} from "./js/programme.js";

const $ = (id) => document.getElementById(id);
const el = {
  station: $("station"),
  name: $("station-name"),
  genre: $("station-genre"),
  description: $("station-description"),
  audio: $("audio"),
  play: $("play"),
  volume: $("volume"),
  listenerCount: $("listener-count"),
  listeners: $("listeners"),
  playerStatus: $("player-status"),
  prompt: $("prompt"),
  since: $("since"),
  blend: $("blend"),
  sourceWrap: $("source-wrap"),
  source: $("source"),
  transition: $("transition"),
  transitionText: $("transition-text"),
  transitionProgress: $("transition-progress"),
  next: $("next"),
  form: $("prompt-form"),
  promptLabel: $("prompt-label"),
  promptHint: $("prompt-hint"),
  promptsOff: $("prompts-off"),
  input: $("prompt-input"),
  send: $("prompt-send"),
  promptStatus: $("prompt-status"),
  history: $("history"),
  historyEmpty: $("history-empty"),
  queueCard: $("queue-card"),
  queueBox: $("queue-box"),
  queue: $("queue"),
  queueEmpty: $("queue-empty"),
  skip: $("skip"),
  skipTally: $("skip-tally"),
  queueClear: $("queue-clear"),
  voteStatus: $("vote-status"),
  todayCard: $("today-card"),
  today: $("today"),
  conn: $("conn"),
  hBuffer: $("h-buffer"),
  hRtf: $("h-rtf"),
  hUnderruns: $("h-underruns"),
  hLatency: $("h-latency"),
  hNote: $("h-note"),
  linkMp3: $("link-mp3"),
  linkHls: $("link-hls"),
  vizIdle: $("viz-idle"),
};

const params = new URLSearchParams(location.search);
const state = {
  stations: [], // [station] as served by /api/stations
  station: null, // the station shown (and played)
  wanted: false, // the listener pressed play and has not paused
  promptTimers: [], // timers of the prompt box's messages
  programmeAt: 0, // Date.now() when the programme was last received (transition progress)
};

const setStatus = (text) => {
  el.playerStatus.textContent = text;
};
const player = new Player(el.audio, {
  onStatus: setStatus,
  onBlocked: () => {
    state.wanted = false;
    picture.stop();
    renderPlaying();
    setStatus("The browser blocked playback: press play.");
  },
});
const picture = new SoundPicture($("viz"), $("meter"), $("meter-fill"));
const adminPanel = new AdminPanel({ onQueueChange: () => state.station && renderQueue() });
const live = new LiveEvents({
  prompt: onPromptEvent,
  listeners: (d) => renderListeners((state.station.listeners = d.listeners || d)),
  health: (d) => renderHealth((state.station.health = d.health || d)),
  programme: (d) => {
    state.station.programme = d;
    state.programmeAt = Date.now();
    renderProgramme();
  },
  queue: (d) => {
    Object.assign((state.station.programme ||= {}), d);
    renderQueue();
  },
  onState: (s) => {
    el.conn.textContent = s;
    el.conn.classList.toggle("ok", s === "live");
  },
  onReconnect: refreshStation, // events sent while we were away are lost: fetch once
});

// ---------------------------------------------------------------- rendering

function renderStation() {
  const s = state.station;
  el.name.textContent = s.name || s.id;
  el.genre.textContent = s.genre || "";
  el.genre.hidden = !s.genre;
  el.description.textContent = s.description || "";
  document.title = `${s.name || s.id} · Endless Radio`;
  renderPrompt();
  renderProgramme();
  renderListeners(s.listeners);
  renderHealth(s.health);
  el.linkMp3.href = s.streams?.mp3 || "#";
  el.linkHls.href = s.streams?.hls || "#";
  el.linkHls.hidden = !s.streams?.hls;
}

function renderPrompt() {
  const s = state.station;
  el.prompt.textContent = s.prompt || "No prompt: the model improvises freely.";
  el.prompt.classList.toggle("unconditional", !s.prompt);
  setTime(el.since, s.prompt_since, true);
  const items = (s.history || []).slice(0, 12);
  el.history.replaceChildren(...items.map((h, i) => historyItem(h, i === 0 && h.prompt === s.prompt)));
  el.historyEmpty.hidden = items.length > 0;
}

function historyItem(h, current) {
  const li = document.createElement("li");
  if (current) li.className = "current";
  const text = document.createElement("span");
  text.className = "h-prompt";
  text.textContent = h.prompt || "(no prompt)";
  const meta = document.createElement("span");
  meta.className = "h-meta";
  const t = document.createElement("time");
  setTime(t, h.at);
  meta.append(t);
  if (h.source) {
    const src = document.createElement("span");
    src.className = "h-source";
    src.textContent = h.source;
    meta.append(src);
  }
  li.append(text, meta);
  return li;
}

function renderListeners(l) {
  if (!l) return;
  const total = typeof l.total === "number" ? l.total : (l.mp3 || 0) + (l.hls || 0);
  el.listenerCount.textContent = `${total} listening`;
  el.listeners.title = `MP3: ${l.mp3 ?? "–"} · HLS: ${l.hls ?? "–"}`;
}

function renderHealth(h) {
  if (!h) return;
  el.hBuffer.textContent = seconds(h.buffer_seconds);
  el.hBuffer.classList.toggle("warn", h.buffer_seconds < 1);
  const f = h.realtime_factor;
  el.hRtf.textContent = typeof f === "number" ? `${f.toFixed(2)}× real time` : "–";
  el.hRtf.classList.toggle("warn", typeof f === "number" && f < 1);
  el.hUnderruns.textContent = typeof h.underruns === "number" ? String(h.underruns) : "–";
  el.hUnderruns.classList.toggle("warn", h.underruns > 0);
  el.hLatency.textContent = seconds(h.prompt_latency_seconds, 2);
  renderHealthNote(h);
}

/** The note under the health figures; a pending reopen counts down from when `h` arrived. */
function renderHealthNote(h) {
  h.receivedAt ??= Date.now();
  let note = "";
  if (typeof h.retry_in_seconds === "number") {
    const wait = Math.ceil(h.retry_in_seconds - (Date.now() - h.receivedAt) / 1000);
    const when = wait > 0 ? `reopening in ${wait} s` : "reopening now";
    note = `Generation is down (${h.error}): ${when}, a bridge plays meanwhile`;
  } else if (h.error) note = `Generation stopped: ${h.error}`;
  else if (h.playing === false) note = "Starting: filling the buffer…";
  if (el.hNote.textContent !== note) el.hNote.textContent = note;
  el.hNote.hidden = !note;
}

function renderPlaying() {
  const on = state.wanted;
  document.body.classList.toggle("is-playing", on);
  el.play.setAttribute("aria-label", on ? "Pause" : "Play");
  el.play.title = on ? "Pause" : "Play";
  if (!on) setStatus("Stopped");
  el.vizIdle.hidden = on && picture.attached;
  if (on && !picture.attached) el.vizIdle.textContent = "No picture of the sound in this browser";
}

// ---------------------------------------------------------------- the programme

function renderProgramme() {
  const p = state.station.programme;
  blendBars(el.blend, state.station.blend);
  el.sourceWrap.hidden = !p?.playing;
  if (p?.playing) {
    el.source.textContent = `chosen by ${sourceText(p.playing.source)}`;
    el.source.title = p.playing.reason || "";
  }
  renderTransition();
  adminPanel.programme(p);
  const next = nextText(p?.next);
  el.next.textContent = next;
  el.next.hidden = !next;
  const today = p?.today || [];
  el.todayCard.hidden = today.length === 0;
  el.today.replaceChildren(...todayItems(today));
  renderQueue();
}

function renderTransition() {
  const p = state.station.programme;
  const progress = transitionProgress(p?.playing, p?.transition, state.programmeAt);
  el.transition.hidden = progress === null;
  if (progress === null) return;
  el.transitionText.textContent = `Gliding into “${p.playing.text}”`;
  el.transitionProgress.value = Math.round(progress * 100);
}

function renderQueue() {
  const p = state.station.programme || {};
  const mode = p.listener_prompts || "now";
  el.form.hidden = mode === "off";
  el.promptsOff.hidden = mode !== "off";
  el.promptLabel.textContent = mode === "queue" ? "Suggest music" : "Steer the music";
  if (!el.send.disabled) el.send.textContent = sendLabel();
  el.promptHint.textContent =
    mode === "queue"
      ? `Listeners vote on suggestions; the most-voted one plays at the next change${p.next ? ` (${hhmm(p.next.at)})` : ""}.`
      : "Everyone listening hears your prompt a moment after you send it.";
  el.queueCard.hidden = mode === "off";
  el.queueBox.hidden = mode !== "queue";
  const queue = p.queue || [];
  const onRemove = adminPanel.token ? onRemoveSuggestion : null;
  el.queue.replaceChildren(...queueItems(queue, onVote, onRemove));
  el.queueEmpty.hidden = queue.length > 0;
  el.queueClear.hidden = !adminPanel.token || mode !== "queue";
  el.queueClear.disabled = queue.length === 0;
  el.skipTally.textContent = skipText(p.skip);
}

async function onRemoveSuggestion(suggestion, button) {
  button.disabled = true;
  await adminPanel.removeSuggestion(suggestion, voteSays);
  button.disabled = false; // the SSE `queue` event redraws the list
}

async function onClearQueue() {
  el.queueClear.disabled = true;
  await adminPanel.clearQueue(voteSays);
  renderQueue();
}

async function onVote(suggestion, button) {
  const id = state.station?.id;
  if (!id) return;
  button.disabled = true;
  let answer;
  try {
    answer = await vote(id, suggestion.id);
  } catch {
    button.disabled = false;
    voteSays("Could not reach the radio.", "error");
    return;
  }
  if (answer.ok) voteSays(`Voted for “${suggestion.text}”.`, "ok");
  else voteSays(answer.body.error || `Refused (HTTP ${answer.status}).`, "error");
  button.disabled = false;
}

async function onSkip() {
  const id = state.station?.id;
  if (!id) return;
  el.skip.disabled = true;
  let answer;
  try {
    answer = await skip(id);
  } catch {
    el.skip.disabled = false;
    voteSays("Could not reach the radio.", "error");
    return;
  }
  el.skip.disabled = false;
  if (!answer.ok) {
    voteSays(answer.body.error || `Refused (HTTP ${answer.status}).`, "error");
    return;
  }
  const t = answer.body.skip;
  Object.assign((state.station.programme ||= {}), { skip: t });
  renderQueue();
  voteSays(t.passed ? "Skipped: the next prompt is on its way." : `Skip vote counted: ${skipText(t)}.`, "ok");
}

function voteSays(text, kind) {
  el.voteStatus.textContent = text;
  el.voteStatus.className = `vote-status ${kind}`;
}

// ---------------------------------------------------------------- stations and events

async function loadStations() {
  let data;
  try {
    data = await getJSON("/api/stations");
  } catch {
    setStatus("The radio cannot be reached. Retrying…");
    setTimeout(loadStations, 3000);
    return;
  }
  state.stations = data.stations || [];
  el.station.replaceChildren(...state.stations.map((s) => new Option(s.name || s.id, s.id)));
  el.station.disabled = state.stations.length < 2;
  const first = state.stations.find((s) => s.id === params.get("station")) || state.stations[0];
  if (!first) {
    setStatus("This radio has no stations.");
    return;
  }
  el.play.disabled = false;
  selectStation(first.id);
}

function selectStation(id) {
  const s = state.stations.find((x) => x.id === id);
  if (!s) return;
  state.station = s;
  el.station.value = id;
  if (state.stations[0].id === id) params.delete("station");
  else params.set("station", id);
  const q = params.toString();
  history.replaceState(null, "", `${location.pathname}${q ? `?${q}` : ""}${location.hash}`);
  clearPromptStatus();
  renderStation();
  adminPanel.station(id);
  live.connect(id);
  if (!s.history) refreshStation(); // the station list leaves the history out
  if (state.wanted) player.play(s);
}

async function refreshStation() {
  const id = state.station?.id;
  if (!id) return;
  try {
    const s = await getJSON(stationUrl(id));
    if (state.station?.id !== id) return;
    Object.assign(state.station, s);
    renderStation();
  } catch {
    /* the event stream's reconnect tries again */
  }
}

/** A `prompt` event: {prompt, since, source, history} (or a whole station). */
function onPromptEvent(d) {
  const s = d.station && typeof d.station === "object" ? d.station : d;
  const st = state.station;
  if (!("prompt_since" in s) && "since" in s) s.prompt_since = s.since;
  if (typeof s.prompt === "string" && !("history" in s) && s.prompt !== st.prompt) {
    // A bare prompt: keep the history right without a round trip.
    st.history = [{ prompt: s.prompt, at: s.prompt_since, source: s.source }].concat(st.history || []);
  }
  for (const k of ["prompt", "blend", "prompt_since", "history", "listeners", "health", "streams"]) {
    if (k in s) st[k] = s[k];
  }
  if ("programme" in s) {
    st.programme = s.programme;
    state.programmeAt = Date.now();
  }
  renderStation();
}

// ---------------------------------------------------------------- play, pause, volume

function togglePlay() {
  if (!state.station) return;
  state.wanted = !state.wanted;
  if (state.wanted) {
    const mode = player.choose(state.station);
    // Web Audio only hears silence from Safari's native HLS, so leave that one alone.
    // Inside this click is where browsers allow the AudioContext to start.
    if (mode !== "native") picture.attach(el.audio);
    player.play(state.station, mode);
    picture.start();
  } else {
    player.stop();
    picture.stop();
  }
  renderPlaying();
}

function applyVolume() {
  const v = Number(el.volume.value) / 100;
  picture.setVolume(v * v, el.audio); // a squared curve sounds even along the slider
  el.volume.setAttribute("aria-valuetext", `${Math.round(v * 100)} percent`);
  try {
    localStorage.setItem("radio.volume", el.volume.value);
  } catch {
    /* storage switched off */
  }
}

// ---------------------------------------------------------------- the prompt box

function clearPromptStatus() {
  for (const t of state.promptTimers) clearTimeout(t);
  state.promptTimers = [];
  promptSays("", "");
  el.send.disabled = false;
  el.send.textContent = sendLabel();
}

const sendLabel = () => (state.station?.programme?.listener_prompts === "queue" ? "Suggest" : "Send");

function promptSays(text, kind) {
  el.promptStatus.textContent = text;
  el.promptStatus.className = `prompt-status ${kind}`;
}

async function onSubmit(event) {
  event.preventDefault();
  if (!state.station || el.send.disabled) return;
  const id = state.station.id;
  const text = el.input.value.trim();
  clearPromptStatus();
  el.send.disabled = true;
  promptSays("Sending…", "busy");
  let answer;
  try {
    answer = await sendPrompt(id, text);
  } catch {
    el.send.disabled = false;
    promptSays("Could not reach the radio. Check your connection and try again.", "error");
    return;
  }
  if (state.station?.id !== id) return;
  if (answer.ok) accepted(id, answer.body, text);
  else refused(answer);
}

function accepted(id, body, text) {
  el.send.disabled = false;
  el.input.value = "";
  if (body.suggestion) {
    const s = body.suggestion;
    promptSays(
      `Suggested: #${body.position} in the queue with ${s.votes} vote${s.votes === 1 ? "" : "s"}. The most-voted one plays at the next change.`,
      "ok",
    );
    return;
  }
  const n = typeof body.heard_in_seconds === "number" ? body.heard_in_seconds : null;
  const behind = player.delay();
  let says = "Sent. It goes on the air in a moment.";
  if (n !== null && behind !== null) {
    const total = (n + behind).toFixed(1);
    says = `Sent. On the air in ${n.toFixed(1)} s; your player is ${behind.toFixed(1)} s behind, so you hear it in about ${total} s.`;
  } else if (n !== null) {
    says = `Sent. On the air in ${n.toFixed(1)} s.`;
  }
  promptSays(says, "ok");
  const prompt = body.prompt ?? text;
  const heard = ((n ?? 2) + (behind ?? 0)) * 1000;
  state.promptTimers.push(
    setTimeout(() => promptSays(`You should be hearing “${prompt}” now.`, "ok"), heard),
    // The event stream normally brings the new prompt; if it is down, ask once.
    setTimeout(
      () => {
        if (state.station?.id === id && state.station.prompt !== prompt) refreshStation();
      },
      (n ?? 2) * 1000 + 1500,
    ),
  );
}

function refused({ status, body, retryAfter }) {
  promptSays(body.error || `The radio refused the prompt (HTTP ${status}).`, "error");
  if (status !== 429 || !retryAfter) {
    el.send.disabled = false;
    return;
  }
  // Rate limited: count down on the button until sending is allowed again.
  let left = retryAfter;
  const tick = () => {
    if (left <= 0) {
      el.send.disabled = false;
      el.send.textContent = sendLabel();
      return;
    }
    el.send.textContent = `Wait ${left} s`;
    left -= 1;
    state.promptTimers.push(setTimeout(tick, 1000));
  };
  tick();
}

// ---------------------------------------------------------------- wiring

el.play.addEventListener("click", togglePlay);
el.station.addEventListener("change", () => selectStation(el.station.value));
el.form.addEventListener("submit", onSubmit);
el.skip.addEventListener("click", onSkip);
el.queueClear.addEventListener("click", onClearQueue);
el.volume.addEventListener("input", applyVolume);
try {
  const v = localStorage.getItem("radio.volume");
  if (v !== null) el.volume.value = v;
} catch {
  /* storage switched off */
}
applyVolume();
setInterval(() => state.station && renderPrompt(), 15000); // keep "3 minutes ago" true
setInterval(() => state.station && renderTransition(), 500); // a transition's progress
setInterval(() => state.station?.health && renderHealthNote(state.station.health), 1000);
picture.paint();
loadStations();
