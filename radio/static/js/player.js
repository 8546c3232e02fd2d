/* Playback of one station on the page's <audio> element.
 *
 *   hls.js          wherever MediaSource exists (Hls.isSupported()),
 *   native HLS      only where MediaSource does not exist but the element plays HLS (iOS Safari),
 *   the MP3 mount   when neither works, or after hls.js or native HLS fails for good.
 *
 * `?player=hls|native|mp3` in the page URL forces one. Pausing a live radio stops it, so play
 * always starts near the live edge. The element's data-mode says which player runs (tests
 * read it). An MP3 stream that ends or fails (the server dropped or restarted) reconnects
 * with a growing delay.
 */

const LABEL = { "hls.js": "HLS via hls.js", native: "HLS (native)", mp3: "MP3" };

const HLS_CONFIG = {
  liveSyncDurationCount: 3, // start three segments behind the live edge
  liveMaxLatencyDurationCount: 10, // jump ahead when playback falls this far behind
  backBufferLength: 30, // seconds kept behind the play head
  maxBufferLength: 30,
  lowLatencyMode: false, // the radio serves plain (not low-latency) HLS
};

const hasMediaSource = () => "MediaSource" in window || "ManagedMediaSource" in window;
const hlsJsWorks = () => typeof window.Hls === "function" && window.Hls.isSupported();

export class Player {
  /** audio: the <audio> element; onStatus(text): a line for the listener; onBlocked(): the
   * browser refused to play without a press (the player has stopped). */
  constructor(audio, { onStatus, onBlocked }) {
    this.audio = audio;
    this.onStatus = onStatus;
    this.onBlocked = onBlocked;
    this.station = null;
    this.mode = null; // "hls.js" | "native" | "mp3" while playing
    this.hls = null;
    this.note = ""; // why this is not the first-choice player, shown with the status
    this.mediaRecovered = false; // one recoverMediaError() per hls.js session
    this.mp3Retries = 0;
    this.retryTimer = 0;
    audio.addEventListener("playing", () => {
      this.mp3Retries = 0;
      this.status("Live");
    });
    audio.addEventListener("waiting", () => this.status("Buffering"));
    audio.addEventListener("error", () => {
      if (audio.hasAttribute("src") && this.mode !== "hls.js") this.trouble("failed");
    });
    audio.addEventListener("ended", () => this.trouble("ended"));
  }

  /** The player this browser should use for `station`. */
  choose(station, forced = new URLSearchParams(location.search).get("player")) {
    if (!station.streams?.hls || forced === "mp3") return "mp3"; // HLS may be switched off
    if (forced === "native") return "native";
    if (forced === "hls" || forced === "hls.js") return hlsJsWorks() ? "hls.js" : "mp3";
    if (hlsJsWorks()) return "hls.js";
    const nativeHls = this.audio.canPlayType("application/vnd.apple.mpegurl") !== "";
    if (!hasMediaSource() && nativeHls) return "native";
    return "mp3";
  }

  get playing() {
    return this.mode !== null;
  }

  /** Start `station` with `mode`; call inside the click so that browsers allow sound. */
  play(station, mode = this.choose(station), note = "") {
    this.stop();
    this.station = station;
    this.mode = mode;
    this.note = note;
    const a = this.audio;
    a.dataset.mode = mode;
    this.status("Connecting");
    if (mode === "hls.js") {
      this.mediaRecovered = false;
      const hls = new window.Hls(HLS_CONFIG);
      this.hls = hls;
      hls.on(window.Hls.Events.ERROR, (_event, data) => this.hlsError(hls, data));
      hls.loadSource(station.streams.hls);
      hls.attachMedia(a);
    } else {
      a.src = mode === "native" ? station.streams.hls : station.streams.mp3;
    }
    a.play()?.catch((err) => {
      // NotAllowedError: the browser wants a press first; AbortError: we stopped meanwhile.
      if (err.name === "NotAllowedError" && this.mode === mode) {
        this.stop();
        this.onBlocked();
      }
    });
  }

  stop() {
    clearTimeout(this.retryTimer);
    if (this.hls) {
      this.hls.destroy();
      this.hls = null;
    }
    const a = this.audio;
    a.pause();
    if (a.hasAttribute("src")) {
      a.removeAttribute("src");
      a.load();
    }
    this.mode = null;
    delete a.dataset.mode;
  }

  /** Seconds between the radio's clock and what this player sounds now; null if unknown. */
  delay() {
    if (!this.playing) return null;
    if (this.hls && Number.isFinite(this.hls.latency) && this.hls.latency > 0) {
      return this.hls.latency; // distance to the live edge of the playlist
    }
    const b = this.audio.buffered;
    if (b.length === 0) return null;
    // MP3 and native HLS arrive in real time, so what is buffered is the delay.
    const ahead = b.end(b.length - 1) - this.audio.currentTime;
    return ahead >= 0 ? ahead : null;
  }

  status(what) {
    if (!this.mode) return;
    const note = this.note ? ` (${this.note})` : "";
    this.onStatus(`${what} · ${LABEL[this.mode]}${note}`);
  }

  hlsError(hls, data) {
    if (!data.fatal || this.hls !== hls) return;
    if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR && !this.mediaRecovered) {
      this.mediaRecovered = true;
      hls.recoverMediaError();
      return;
    }
    this.play(this.station, "mp3", `HLS failed: ${data.details}`);
  }

  trouble(kind) {
    if (this.mode === "native") {
      this.play(this.station, "mp3", `native HLS ${kind}`);
    } else if (this.mode === "mp3") {
      const delay = Math.min(10000, 1000 * 2 ** this.mp3Retries++);
      this.status(`Stream ${kind}, reconnecting in ${Math.round(delay / 1000)} s`);
      clearTimeout(this.retryTimer);
      const { station, note } = this;
      this.retryTimer = setTimeout(() => this.play(station, "mp3", note), delay);
    }
  }
}
