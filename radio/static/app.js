/* Endless Radio web player.
 *
 * One page, no build step. It lists the stations (GET /api/stations), shows the current
 * prompt, its history, listeners and generation health, keeps them live through Server-Sent
 * Events (GET /api/stations/{id}/events, reconnecting on loss), sends new prompts
 * (POST /api/stations/{id}/prompt) and plays the station:
 *
 *   hls.js          wherever MediaSource exists (Hls.isSupported()),
 *   native HLS      only where MediaSource does not exist but the browser plays HLS (iOS Safari),
 *   the MP3 mount   when neither works, or when hls.js or native HLS fails fatally.
 *
 * `?player=hls|native|mp3` forces a player and `?station=ID` picks a station. The sound is
 * drawn live (spectrum and level meter) from a Web Audio AnalyserNode on the audio element.
 * The <audio> element carries data-mode (the player in use) so tests can read it.
 */
(() => {
  "use strict";

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
    form: $("prompt-form"),
    input: $("prompt-input"),
    send: $("prompt-send"),
    promptStatus: $("prompt-status"),
    history: $("history"),
    historyEmpty: $("history-empty"),
    conn: $("conn"),
    hBuffer: $("h-buffer"),
    hRtf: $("h-rtf"),
    hUnderruns: $("h-underruns"),
    hLatency: $("h-latency"),
    hNote: $("h-note"),
    linkMp3: $("link-mp3"),
    linkHls: $("link-hls"),
    canvas: $("viz"),
    vizIdle: $("viz-idle"),
    meter: $("meter"),
    meterFill: $("meter-fill"),
  };

  const params = new URLSearchParams(location.search);
  const state = {
    stations: [], // [station] as served by /api/stations
    station: null, // the station shown and played
    wanted: false, // the listener asked to play (and has not paused)
    mode: null, // "hls.js" | "native" | "mp3" while playing
    hls: null, // the Hls instance in "hls.js" mode
    mediaRecovered: false, // one recoverMediaError() per hls.js session
    note: "", // why the player is not the first choice (shown with the status)
    mp3Retry: 0, // consecutive MP3 reconnects
    retryTimer: 0,
    events: null, // the EventSource of the current station
    eventsRetry: 0,
    eventsTimer: 0,
    promptTimers: [],
    graph: null, // {ctx, analyser, gain} once Web Audio is wired
  };

  // ---------------------------------------------------------------- formatting

  const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const hhmm = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const clock = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

  function ago(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return "";
    const s = Math.round((t - Date.now()) / 1000);
    if (s > -45) return "just now";
    const m = Math.round(s / 60);
    if (m > -60) return rtf.format(m, "minute");
    const h = Math.round(m / 60);
    if (h > -24) return rtf.format(h, "hour");
    return rtf.format(Math.round(h / 24), "day");
  }

  function setTime(node, iso) {
    node.dateTime = iso || "";
    node.textContent = iso ? ago(iso) : "";
    const t = Date.parse(iso);
    node.title = Number.isNaN(t) ? "" : clock.format(t);
  }

  function seconds(x, digits = 1) {
    return typeof x === "number" && Number.isFinite(x) ? `${x.toFixed(digits)} s` : "–";
  }

  // ---------------------------------------------------------------- API

  async function getJSON(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  const apiBase = (id) => `/api/stations/${encodeURIComponent(id)}`;

  // ---------------------------------------------------------------- rendering

  function renderStation() {
    const s = state.station;
    if (!s) return;
    el.name.textContent = s.name || s.id;
    el.genre.textContent = s.genre || "";
    el.genre.hidden = !s.genre;
    el.description.textContent = s.description || "";
    document.title = `${s.name || s.id} · Endless Radio`;
    renderPrompt();
    renderListeners(s.listeners);
    renderHealth(s.health);
    if (s.streams) {
      el.linkMp3.href = s.streams.mp3 || "#";
      el.linkHls.href = s.streams.hls || "#";
    }
  }

  function renderPrompt() {
    const s = state.station;
    const text = s.prompt || "";
    el.prompt.textContent = text || "No prompt: the model improvises freely.";
    el.prompt.classList.toggle("unconditional", !text);
    setSince();
    renderHistory(s.history || []);
  }

  function renderHistory(items) {
    const s = state.station;
    el.history.replaceChildren(
      ...items.slice(0, 12).map((h, i) => {
        const li = document.createElement("li");
        if (i === 0 && h.prompt === s.prompt) li.className = "current";
        const p = document.createElement("span");
        p.className = "h-prompt";
        p.textContent = h.prompt || "(no prompt)";
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
        li.append(p, meta);
        return li;
      }),
    );
    el.historyEmpty.hidden = items.length > 0;
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
    let note = "";
    if (h.error) note = `Generation stopped: ${h.error}`;
    else if (h.playing === false) note = "Starting: filling the buffer…";
    el.hNote.textContent = note;
    el.hNote.hidden = !note;
  }

  function setSince() {
    const iso = state.station.prompt_since;
    setTime(el.since, iso);
    const t = Date.parse(iso);
    if (!Number.isNaN(t)) el.since.textContent += ` · ${hhmm.format(t)}`;
  }

  function refreshTimes() {
    if (!state.station) return;
    setSince();
    for (const t of el.history.querySelectorAll("time")) setTime(t, t.dateTime);
  }

  // ---------------------------------------------------------------- stations

  async function loadStations() {
    let data;
    try {
      data = await getJSON("/api/stations");
    } catch (err) {
      el.playerStatus.textContent = "The radio cannot be reached. Retrying…";
      setTimeout(loadStations, 3000);
      return;
    }
    state.stations = data.stations || [];
    el.station.replaceChildren(
      ...state.stations.map((s) => new Option(s.name || s.id, s.id)),
    );
    el.station.disabled = state.stations.length < 2;
    const wanted = params.get("station");
    const first = state.stations.find((s) => s.id === wanted) || state.stations[0];
    if (!first) {
      el.playerStatus.textContent = "This radio has no stations.";
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
    connectEvents();
    if (!s.history) refreshStation(); // the list leaves the history out
    if (state.wanted) {
      state.note = "";
      startPlayback();
    }
  }

  async function refreshStation() {
    const id = state.station?.id;
    if (!id) return;
    try {
      const s = await getJSON(apiBase(id));
      if (state.station?.id !== id) return;
      Object.assign(state.station, s);
      renderStation();
    } catch {
      /* the event stream's reconnect will try again */
    }
  }

  // ---------------------------------------------------------------- live events (SSE)

  function setConn(text, ok) {
    el.conn.textContent = text;
    el.conn.classList.toggle("ok", !!ok);
  }

  function parse(e) {
    try {
      return JSON.parse(e.data);
    } catch {
      return null;
    }
  }

  function connectEvents() {
    closeEvents();
    const id = state.station.id;
    const es = new EventSource(`${apiBase(id)}/events`);
    state.events = es;
    let opened = false;
    es.onopen = () => {
      // After a reconnect, fetch once: events sent while we were away are lost.
      if (opened || state.eventsRetry > 0) refreshStation();
      opened = true;
      state.eventsRetry = 0;
      setConn("live", true);
    };
    es.onerror = () => {
      setConn("reconnecting", false);
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (HTTP error or wrong type): retry ourselves, backing off.
        const delay = Math.min(30000, 1000 * 2 ** state.eventsRetry++);
        state.eventsTimer = setTimeout(() => {
          if (state.events === es) connectEvents();
        }, delay);
      }
    };
    // "station" is a full snapshot (sent on connect); "prompt" carries at least the prompt.
    const onStation = (e) => {
      const d = parse(e);
      if (!d || state.events !== es) return;
      const s = d.station && typeof d.station === "object" ? d.station : d;
      if (!("prompt_since" in s) && "since" in s) s.prompt_since = s.since;
      const st = state.station;
      if (typeof s.prompt === "string" && !("history" in s) && s.prompt !== st.prompt) {
        // A bare prompt event: keep the history list right without a round trip.
        st.history = [{ prompt: s.prompt, at: s.prompt_since || new Date().toISOString() }]
          .concat(st.history || []);
      }
      for (const k of ["prompt", "prompt_since", "history", "listeners", "health", "streams"]) {
        if (k in s) state.station[k] = s[k];
      }
      renderStation();
    };
    es.addEventListener("station", onStation);
    es.addEventListener("prompt", onStation);
    es.addEventListener("listeners", (e) => {
      const d = parse(e);
      if (!d || state.events !== es) return;
      state.station.listeners = d.listeners || d;
      renderListeners(state.station.listeners);
    });
    es.addEventListener("health", (e) => {
      const d = parse(e);
      if (!d || state.events !== es) return;
      state.station.health = d.health || d;
      renderHealth(state.station.health);
    });
  }

  function closeEvents() {
    clearTimeout(state.eventsTimer);
    if (state.events) state.events.close();
    state.events = null;
    setConn("connecting", false);
  }

  // ---------------------------------------------------------------- playback

  const hasMediaSource = () => "MediaSource" in window || "ManagedMediaSource" in window;
  const hlsJsWorks = () => typeof window.Hls === "function" && window.Hls.isSupported();
  const nativeHls = () => el.audio.canPlayType("application/vnd.apple.mpegurl") !== "";

  function chooseMode() {
    const forced = params.get("player");
    if (!state.station.streams.hls || forced === "mp3") return "mp3"; // HLS may be off
    if (forced === "native") return "native";
    if (forced === "hls" || forced === "hls.js") return hlsJsWorks() ? "hls.js" : "mp3";
    if (hlsJsWorks()) return "hls.js";
    if (!hasMediaSource() && nativeHls()) return "native";
    return "mp3";
  }

  const modeLabel = { "hls.js": "HLS via hls.js", native: "HLS (native)", mp3: "MP3" };

  function setStatus(text) {
    el.playerStatus.textContent = state.note && state.wanted ? `${text} (${state.note})` : text;
  }

  function startPlayback(mode = chooseMode()) {
    teardown();
    const s = state.station;
    const a = el.audio;
    state.mode = mode;
    a.dataset.mode = mode;
    setStatus(`Connecting · ${modeLabel[mode]}`);
    if (mode === "hls.js") {
      state.mediaRecovered = false;
      const hls = new window.Hls({
        liveSyncDurationCount: 3, // start three segments behind the live edge
        liveMaxLatencyDurationCount: 10, // jump ahead when we fall this far behind
        backBufferLength: 30,
        maxBufferLength: 30,
        lowLatencyMode: false,
      });
      state.hls = hls;
      hls.on(window.Hls.Events.ERROR, (_ev, data) => onHlsError(hls, data));
      hls.loadSource(s.streams.hls);
      hls.attachMedia(a);
    } else {
      a.src = mode === "native" ? s.streams.hls : s.streams.mp3;
    }
    const p = a.play();
    if (p) {
      p.catch((err) => {
        // NotAllowedError: autoplay blocked; AbortError: we tore this session down.
        if (err.name === "NotAllowedError" && state.mode === mode) {
          state.wanted = false;
          teardown();
          setStatus("The browser blocked playback: press play.");
          renderPlaying();
        }
      });
    }
    renderPlaying();
  }

  function onHlsError(hls, data) {
    if (!data.fatal || state.hls !== hls) return;
    if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR && !state.mediaRecovered) {
      state.mediaRecovered = true;
      hls.recoverMediaError();
      return;
    }
    fallBackToMp3(`HLS failed: ${data.details}`);
  }

  function fallBackToMp3(why) {
    if (!state.wanted) return;
    state.note = why;
    startPlayback("mp3");
  }

  function teardown() {
    clearTimeout(state.retryTimer);
    if (state.hls) {
      state.hls.destroy();
      state.hls = null;
    }
    const a = el.audio;
    a.pause();
    if (a.hasAttribute("src")) {
      a.removeAttribute("src");
      a.load();
    }
    state.mode = null;
    delete a.dataset.mode;
  }

  function onAudioTrouble(kind) {
    if (!state.wanted || !state.mode) return;
    if (state.mode === "native") {
      fallBackToMp3(`Native HLS ${kind}`);
    } else if (state.mode === "mp3") {
      // A live mount ends when the server drops us or restarts: reconnect, backing off.
      const delay = Math.min(10000, 1000 * 2 ** state.mp3Retry++);
      setStatus(`Stream ${kind}: reconnecting in ${Math.round(delay / 1000)} s`);
      clearTimeout(state.retryTimer);
      state.retryTimer = setTimeout(() => state.wanted && startPlayback("mp3"), delay);
    }
  }

  function renderPlaying() {
    const on = state.wanted;
    document.body.classList.toggle("is-playing", on);
    el.play.setAttribute("aria-label", on ? "Pause" : "Play");
    el.play.title = on ? "Pause" : "Play";
    if (!on) setStatus("Stopped");
    el.vizIdle.hidden = on && !!state.graph;
    if (on && !state.graph) el.vizIdle.textContent = "No picture in this browser";
  }

  function togglePlay() {
    if (!state.station) return;
    state.wanted = !state.wanted;
    if (state.wanted) {
      const mode = chooseMode();
      // Safari routes native HLS into Web Audio as silence, so only wire the graph otherwise.
      // The graph is built here, inside the click, where browsers allow an AudioContext.
      if (mode !== "native") ensureGraph();
      if (state.graph) state.graph.ctx.resume().catch(() => {});
      state.mp3Retry = 0;
      state.note = "";
      startPlayback(mode);
      startDrawing();
    } else {
      teardown();
      renderPlaying();
    }
  }

  el.audio.addEventListener("playing", () => {
    state.mp3Retry = 0;
    if (state.mode) setStatus(`Live · ${modeLabel[state.mode]}`);
  });
  el.audio.addEventListener("waiting", () => {
    if (state.mode) setStatus(`Buffering · ${modeLabel[state.mode]}`);
  });
  el.audio.addEventListener("error", () => {
    if (el.audio.hasAttribute("src") && state.mode !== "hls.js") onAudioTrouble("failed");
  });
  el.audio.addEventListener("ended", () => onAudioTrouble("ended"));

  // ---------------------------------------------------------------- volume

  function applyVolume() {
    const v = Number(el.volume.value) / 100; // 0..1, perceived loudness
    const g = v * v; // a squared curve feels even across the slider
    if (state.graph) {
      state.graph.gain.gain.value = g;
      el.audio.volume = 1;
    } else {
      el.audio.volume = g;
    }
    el.volume.setAttribute("aria-valuetext", `${Math.round(v * 100)} percent`);
    try {
      localStorage.setItem("radio.volume", el.volume.value);
    } catch {
      /* private mode */
    }
  }

  // ---------------------------------------------------------------- Web Audio picture

  function ensureGraph() {
    if (state.graph) return;
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return;
    try {
      el.audio.crossOrigin = "anonymous";
      const ctx = new Ctx();
      const source = ctx.createMediaElementSource(el.audio);
      const analyser = ctx.createAnalyser();
      analyser.fftSize = 4096;
      analyser.smoothingTimeConstant = 0.75;
      analyser.minDecibels = -95;
      analyser.maxDecibels = -25;
      const gain = ctx.createGain();
      source.connect(analyser); // the picture does not depend on the volume
      analyser.connect(gain);
      gain.connect(ctx.destination);
      state.graph = {
        ctx,
        analyser,
        gain,
        freq: new Uint8Array(analyser.frequencyBinCount),
        wave: new Float32Array(analyser.fftSize),
      };
      applyVolume();
    } catch {
      state.graph = null;
    }
  }

  const reduceMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
  const BARS = 56;
  const bars = new Float32Array(BARS); // smoothed heights 0..1
  let drawing = false;
  let meterDb = -60;
  let meterShown = 0;

  function sizeCanvas() {
    const c = el.canvas;
    const dpr = Math.min(window.devicePixelRatio || 1, 2);
    const w = Math.max(1, Math.round(c.clientWidth * dpr));
    const h = Math.max(1, Math.round(c.clientHeight * dpr));
    if (c.width !== w || c.height !== h) {
      c.width = w;
      c.height = h;
    }
  }

  function startDrawing() {
    if (drawing) return;
    drawing = true;
    requestAnimationFrame(draw);
  }

  function draw(now) {
    const g = state.graph;
    const active = state.wanted && g;
    if (active) readSound(g);
    else {
      bars.fill(0);
      meterDb = -60;
    }
    paint();
    paintMeter(now);
    if (state.wanted) requestAnimationFrame(draw);
    else {
      drawing = false;
      paint();
    }
  }

  function readSound(g) {
    const { analyser, freq, wave } = g;
    analyser.getByteFrequencyData(freq);
    analyser.getFloatTimeDomainData(wave);
    // Log-spaced bands from 40 Hz to 16 kHz (the stream is 32 kHz: nothing above).
    const nyquist = g.ctx.sampleRate / 2;
    const lo = Math.log(40);
    const hi = Math.log(Math.min(16000, nyquist));
    for (let b = 0; b < BARS; b++) {
      const f0 = Math.exp(lo + ((hi - lo) * b) / BARS);
      const f1 = Math.exp(lo + ((hi - lo) * (b + 1)) / BARS);
      const i0 = Math.floor((f0 / nyquist) * freq.length);
      const i1 = Math.max(i0 + 1, Math.ceil((f1 / nyquist) * freq.length));
      let peak = 0;
      for (let i = i0; i < i1 && i < freq.length; i++) peak = Math.max(peak, freq[i]);
      const v = peak / 255;
      bars[b] = v > bars[b] ? v : bars[b] * 0.9 + v * 0.1;
    }
    let sum = 0;
    for (let i = 0; i < wave.length; i++) sum += wave[i] * wave[i];
    const rms = Math.sqrt(sum / wave.length);
    meterDb = Math.max(-60, Math.min(0, 20 * Math.log10(rms || 1e-6)));
  }

  function paint() {
    sizeCanvas();
    const c = el.canvas;
    const ctx = c.getContext("2d");
    const { width: w, height: h } = c;
    ctx.clearRect(0, 0, w, h);
    const styles = getComputedStyle(document.body);
    const a = styles.getPropertyValue("--accent").trim() || "#f2a65a";
    const b = styles.getPropertyValue("--accent-2").trim() || "#59c3c3";
    const grad = ctx.createLinearGradient(0, h, 0, 0);
    grad.addColorStop(0, b);
    grad.addColorStop(1, a);
    ctx.fillStyle = grad;
    const gap = Math.max(2, w / BARS / 4);
    const bw = (w - gap * (BARS - 1)) / BARS;
    const floor = Math.max(2, h * 0.02);
    for (let i = 0; i < BARS; i++) {
      const v = reduceMotion.matches ? Math.round(bars[i] * 8) / 8 : bars[i];
      const bh = Math.max(floor, v * (h - floor));
      const x = i * (bw + gap);
      const r = Math.min(bw / 2, 4);
      if (ctx.roundRect) {
        ctx.beginPath();
        ctx.roundRect(x, h - bh, bw, bh, [r, r, 0, 0]);
        ctx.fill();
      } else {
        ctx.fillRect(x, h - bh, bw, bh); // older browsers
      }
    }
  }

  function paintMeter(now) {
    const pct = ((meterDb + 60) / 60) * 100;
    el.meterFill.style.transform = `scaleX(${1 - pct / 100})`;
    // Screen readers and tests read the value: update it a few times a second, not per frame.
    if (!meterShown || now - meterShown > 250) {
      meterShown = now || 1;
      const db = Math.round(meterDb);
      el.meter.setAttribute("aria-valuenow", String(db));
      el.meter.setAttribute("aria-valuetext", db <= -60 ? "silent" : `${db} dBFS`);
    }
  }

  // ---------------------------------------------------------------- prompts

  /** Seconds between the radio's clock and what this player sounds now; null when unknown. */
  function playerDelay() {
    if (!state.wanted || !state.mode) return null;
    const a = el.audio;
    if (state.hls && Number.isFinite(state.hls.latency) && state.hls.latency > 0) {
      return state.hls.latency; // hls.js: distance to the live edge of the playlist
    }
    if (a.buffered.length === 0) return null;
    // MP3 and native HLS: the server sends in real time, so what is buffered is the delay.
    const ahead = a.buffered.end(a.buffered.length - 1) - a.currentTime;
    return ahead >= 0 ? ahead : null;
  }

  function clearPromptStatus() {
    for (const t of state.promptTimers) clearTimeout(t);
    state.promptTimers = [];
    el.promptStatus.textContent = "";
    el.promptStatus.className = "prompt-status";
    el.send.disabled = false;
    el.send.textContent = "Send";
  }

  function promptSays(text, kind) {
    el.promptStatus.textContent = text;
    el.promptStatus.className = `prompt-status ${kind}`;
  }

  async function sendPrompt(ev) {
    ev.preventDefault();
    if (!state.station || el.send.disabled) return;
    const id = state.station.id;
    const text = el.input.value.trim();
    clearPromptStatus();
    el.send.disabled = true;
    promptSays("Sending…", "busy");
    let r;
    let body = {};
    try {
      r = await fetch(`${apiBase(id)}/prompt`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ prompt: text }),
      });
      body = await r.json().catch(() => ({}));
    } catch (err) {
      el.send.disabled = false;
      promptSays("Could not reach the radio. Check your connection and try again.", "error");
      return;
    }
    if (state.station?.id !== id) return;
    if (r.ok) {
      el.send.disabled = false;
      el.input.value = "";
      const n = typeof body.heard_in_seconds === "number" ? body.heard_in_seconds : null;
      const behind = playerDelay();
      let says = n === null ? "Sent. It goes on the air in a moment." : `Sent. On the air in ${n.toFixed(1)} s`;
      if (n !== null && behind !== null) {
        says += `; your player is ${behind.toFixed(1)} s behind, so you hear it in about ${(n + behind).toFixed(1)} s.`;
      } else if (n !== null) says += ".";
      promptSays(says, "ok");
      const ms = ((n ?? 2) + (behind ?? 0)) * 1000;
      state.promptTimers.push(
        setTimeout(() => promptSays(`You should be hearing “${body.prompt ?? text}” now.`, "ok"), ms),
        // Events normally bring the new prompt; if they are down, ask once.
        setTimeout(
          () => {
            if (state.station?.id === id && state.station.prompt !== (body.prompt ?? text)) {
              refreshStation();
            }
          },
          (n ?? 2) * 1000 + 1500,
        ),
      );
      return;
    }
    const reason = body.error || `The radio refused the prompt (HTTP ${r.status}).`;
    const wait = Number.parseInt(r.headers.get("Retry-After") || "", 10);
    if (r.status === 429 && wait > 0) {
      // Rate limited: say why, and count down on the button until sending is allowed again.
      promptSays(reason, "error");
      let left = wait;
      const tick = () => {
        if (left <= 0) {
          el.send.disabled = false;
          el.send.textContent = "Send";
          return;
        }
        el.send.textContent = `Wait ${left} s`;
        left -= 1;
        state.promptTimers.push(setTimeout(tick, 1000));
      };
      tick();
    } else {
      el.send.disabled = false;
      promptSays(reason, "error");
    }
  }

  // ---------------------------------------------------------------- wiring

  el.play.addEventListener("click", togglePlay);
  el.station.addEventListener("change", () => selectStation(el.station.value));
  el.form.addEventListener("submit", sendPrompt);
  el.volume.addEventListener("input", applyVolume);
  try {
    const v = localStorage.getItem("radio.volume");
    if (v !== null) el.volume.value = v;
  } catch {
    /* private mode */
  }
  applyVolume();
  window.addEventListener("resize", () => paint());
  reduceMotion.addEventListener?.("change", () => paint());
  setInterval(refreshTimes, 15000);
  paint();
  loadStations();
})();
