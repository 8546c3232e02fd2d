/* A live picture of the sound: a spectrum on a <canvas> and a level meter, from a Web Audio
 * AnalyserNode fed by the <audio> element (createMediaElementSource), plus the volume.
 *
 * Graph: element -> analyser -> gain (volume) -> speakers, so the picture does not depend on
 * the volume. The graph can only be built once per element, and only inside a user gesture
 * (browsers keep an AudioContext made elsewhere suspended, which would silence the element):
 * `attach()` is called from the play button's click. The stream must be same-origin or CORS
 * (hls.js's MediaSource always is), else Web Audio hears silence.
 */

const BARS = 56; // spectrum bars, log-spaced from 40 Hz to 16 kHz (the stream is 32 kHz)
const FLOOR_DB = -60; // the meter's bottom, dBFS

export class SoundPicture {
  /** canvas: <canvas>; meter: role="meter" element; mask: the meter's cover above the level. */
  constructor(canvas, meter, mask) {
    this.canvas = canvas;
    this.meter = meter;
    this.mask = mask;
    this.graph = null; // {ctx, analyser, gain, freq, wave} once attached
    this.bars = new Float32Array(BARS); // smoothed heights 0..1
    this.db = FLOOR_DB;
    this.running = false;
    this.volume = 1;
    this.shownAt = 0;
    this.reduceMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
    window.addEventListener("resize", () => this.paint());
    this.reduceMotion.addEventListener?.("change", () => this.paint());
  }

  /** Route `audio` through Web Audio; false where the browser cannot. Call inside a click. */
  attach(audio) {
    if (this.graph) {
      this.graph.ctx.resume().catch(() => {});
      return true;
    }
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return false;
    try {
      audio.crossOrigin = "anonymous";
      const ctx = new Ctx();
      const source = ctx.createMediaElementSource(audio);
      const analyser = ctx.createAnalyser();
      analyser.fftSize = 4096;
      analyser.smoothingTimeConstant = 0.75;
      analyser.minDecibels = -95;
      analyser.maxDecibels = -25;
      const gain = ctx.createGain();
      source.connect(analyser);
      analyser.connect(gain);
      gain.connect(ctx.destination);
      const freq = new Uint8Array(analyser.frequencyBinCount);
      const wave = new Float32Array(analyser.fftSize);
      this.graph = { ctx, analyser, gain, freq, wave };
      this.setVolume(this.volume, audio);
      ctx.resume().catch(() => {});
      return true;
    } catch {
      return false;
    }
  }

  get attached() {
    return this.graph !== null;
  }

  /** Volume 0..1 (already shaped): on the gain node when attached, else on the element. */
  setVolume(v, audio) {
    this.volume = v;
    if (this.graph) {
      this.graph.gain.gain.value = v;
      audio.volume = 1;
    } else {
      audio.volume = v;
    }
  }

  start() {
    if (this.running) return;
    this.running = true;
    requestAnimationFrame((t) => this.frame(t));
  }

  stop() {
    this.running = false;
  }

  frame(now) {
    if (this.running && this.graph) this.read();
    else {
      this.bars.fill(0);
      this.db = FLOOR_DB;
    }
    this.paint();
    this.paintMeter(now);
    if (this.running) requestAnimationFrame((t) => this.frame(t));
  }

  read() {
    const { ctx, analyser, freq, wave } = this.graph;
    analyser.getByteFrequencyData(freq);
    analyser.getFloatTimeDomainData(wave);
    const nyquist = ctx.sampleRate / 2;
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
      this.bars[b] = v > this.bars[b] ? v : this.bars[b] * 0.9 + v * 0.1; // fast up, slow down
    }
    let sum = 0;
    for (let i = 0; i < wave.length; i++) sum += wave[i] * wave[i];
    const rms = Math.sqrt(sum / wave.length);
    this.db = Math.max(FLOOR_DB, Math.min(0, 20 * Math.log10(rms || 1e-6)));
  }

  paint() {
    const c = this.canvas;
    const dpr = Math.min(window.devicePixelRatio || 1, 2);
    const w = Math.max(1, Math.round(c.clientWidth * dpr));
    const h = Math.max(1, Math.round(c.clientHeight * dpr));
    if (c.width !== w || c.height !== h) {
      c.width = w;
      c.height = h;
    }
    const g = c.getContext("2d");
    g.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.body);
    const grad = g.createLinearGradient(0, h, 0, 0);
    grad.addColorStop(0, css.getPropertyValue("--accent-2").trim() || "#59c3c3");
    grad.addColorStop(1, css.getPropertyValue("--accent").trim() || "#f2a65a");
    g.fillStyle = grad;
    const gap = Math.max(2, w / BARS / 4);
    const bw = (w - gap * (BARS - 1)) / BARS;
    if (bw <= 0) return; // not laid out yet, or too narrow for the bars (a hidden panel)
    const floor = Math.max(2, h * 0.02);
    const r = Math.min(bw / 2, 4);
    for (let i = 0; i < BARS; i++) {
      const v = this.reduceMotion.matches ? Math.round(this.bars[i] * 8) / 8 : this.bars[i];
      const bh = Math.max(floor, v * (h - floor));
      const x = i * (bw + gap);
      if (g.roundRect) {
        g.beginPath();
        g.roundRect(x, h - bh, bw, bh, [r, r, 0, 0]);
        g.fill();
      } else {
        g.fillRect(x, h - bh, bw, bh); // older browsers
      }
    }
  }

  paintMeter(now) {
    const level = (this.db - FLOOR_DB) / -FLOOR_DB; // 0..1
    this.mask.style.transform = `scaleX(${1 - level})`;
    // Screen readers and tests read the value: a few updates a second, not one per frame.
    if (this.shownAt && now - this.shownAt < 250 && this.running) return;
    this.shownAt = now || 1;
    const db = Math.round(this.db);
    this.meter.setAttribute("aria-valuenow", String(db));
    this.meter.setAttribute("aria-valuetext", db <= FLOOR_DB ? "silent" : `${db} dBFS`);
  }
}
