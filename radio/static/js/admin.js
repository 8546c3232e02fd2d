/* The admin part of the page: with the admin token entered, edit the station's schedule, seed it
 * from an uploaded clip, pin or unpin a prompt, remove suggestions and clear the queue.
 *
 * The token is kept in this tab's sessionStorage only (gone when the tab closes) and sent as
 * `Authorization: Bearer <token>`; never in a URL, never in localStorage. The page cannot tell a
 * right token from a wrong one until the radio answers an action: a refusal (401, 403: "wrong
 * admin token") is shown like every other reason, in plain words, in a live region.
 */

import { admin, getJSON, stationUrl } from "./api.js";
import { hhmm } from "./programme.js";
import { FormError, parsePromptLine, plainReason, ScheduleForm, slotsNamed } from "./schedule-form.js";

const TOKEN_KEY = "radio.adminToken";

/** The server's reason of a refused answer, or a sentence with its status. */
const reason = (answer) => answer.body?.error || `the radio answered HTTP ${answer.status}`;

export class AdminPanel {
  /** onQueueChange(): the admin buttons of the queue must be drawn again (token set or forgotten). */
  constructor({ onQueueChange }) {
    const $ = (id) => document.getElementById(id);
    this.el = {
      tokenForm: $("token-form"),
      token: $("admin-token"),
      tokenForget: $("token-forget"),
      tokenStatus: $("token-status"),
      tools: $("admin-tools"),
      scheduleForm: $("schedule-form"),
      slotAdd: $("slot-add"),
      scheduleReload: $("schedule-reload"),
      scheduleSave: $("schedule-save"),
      scheduleStatus: $("schedule-status"),
      clipForm: $("clip-form"),
      clipFile: $("clip-file"),
      clipPrompt: $("clip-prompt"),
      clipSend: $("clip-send"),
      clipStatus: $("clip-status"),
      pinForm: $("pin-form"),
      pinNow: $("pin-now"),
      pinPrompt: $("pin-prompt"),
      pinMinutes: $("pin-minutes"),
      pinSend: $("pin-send"),
      unpin: $("unpin"),
      pinStatus: $("pin-status"),
    };
    this.schedule = new ScheduleForm(this.el.scheduleForm, $("slots"));
    this.onQueueChange = onQueueChange;
    this.stationId = null;
    this.wire();
    this.showToken();
  }

  /** The token of this tab, or "" without one. */
  get token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return this.memoryToken || ""; // storage switched off: this page's lifetime only
    }
  }

  set token(value) {
    this.memoryToken = value;
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      /* storage switched off: kept in memory above */
    }
  }

  /** The page shows station `id`: load its schedule into the editor. */
  station(id) {
    this.stationId = id;
    say(this.el.scheduleStatus, "", "");
    if (this.token) this.loadSchedule();
  }

  /** The station's `programme` changed: show what is pinned. */
  programme(p) {
    const pin = p?.pinned;
    this.el.pinNow.textContent = pin
      ? `Pinned: “${pin.text}” ${pin.until ? `until ${hhmm(pin.until)}` : "until unpinned"}.`
      : "Nothing is pinned: the schedule and the listeners choose.";
    this.el.unpin.disabled = !pin;
  }

  wire() {
    const e = this.el;
    e.tokenForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = e.token.value.trim();
      if (!value) {
        say(e.tokenStatus, "Type the admin token first (security.admin_token of the radio).", "error");
        return;
      }
      this.token = value;
      e.token.value = "";
      this.showToken();
      say(e.tokenStatus, "Token kept for this tab. The radio checks it when you make a change.", "ok");
      this.loadSchedule();
    });
    e.tokenForget.addEventListener("click", () => {
      this.token = "";
      this.showToken();
      say(e.tokenStatus, "Token forgotten.", "ok");
      e.token.focus();
    });
    e.scheduleForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.saveSchedule();
    });
    e.slotAdd.addEventListener("click", () => this.schedule.addSlot().querySelector("input").focus());
    e.scheduleReload.addEventListener("click", () => this.loadSchedule("Changes discarded."));
    e.clipForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.uploadClip();
    });
    e.pinForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.pin();
    });
    e.unpin.addEventListener("click", () => this.unpin());
  }

  showToken() {
    const on = Boolean(this.token);
    this.el.tools.hidden = !on;
    this.el.tokenForget.hidden = !on;
    this.el.token.placeholder = on ? "a token is set for this tab" : "";
    this.onQueueChange();
  }

  /** Send an admin request for the shown station; the answer, or null when unreachable. */
  async call(method, path, options, status) {
    try {
      return await admin(method, `${stationUrl(this.stationId)}${path}`, this.token, options);
    } catch {
      say(status, "Could not reach the radio. Check your connection and try again.", "error");
      return null;
    }
  }

  // ---- schedule

  async loadSchedule(done = "") {
    const id = this.stationId;
    if (!id) return;
    try {
      const data = await getJSON(`${stationUrl(id)}/schedule`);
      if (id !== this.stationId) return;
      this.schedule.show(data.programme);
      this.schedule.markInvalid(new Set());
      if (done) say(this.el.scheduleStatus, done, "ok");
    } catch {
      say(this.el.scheduleStatus, "Could not load the schedule from the radio.", "error");
    }
  }

  async saveSchedule() {
    const e = this.el;
    let body;
    try {
      body = this.schedule.read();
    } catch (err) {
      if (!(err instanceof FormError)) throw err;
      say(e.scheduleStatus, `Not saved: ${err.message}.`, "error");
      return;
    }
    e.scheduleSave.disabled = true;
    say(e.scheduleStatus, "Saving…", "busy");
    const answer = await this.call("PUT", "/schedule", { json: body }, e.scheduleStatus);
    e.scheduleSave.disabled = false;
    if (!answer) return;
    if (!answer.ok) {
      const why = reason(answer);
      this.schedule.markInvalid(slotsNamed(why));
      say(e.scheduleStatus, `Not saved: ${plainReason(why)}. The radio keeps the schedule it had.`, "error");
      return;
    }
    this.schedule.show(answer.body.programme);
    this.schedule.markInvalid(new Set());
    const slots = answer.body.programme.schedule.length;
    say(e.scheduleStatus, `Saved: ${slots} slot${slots === 1 ? "" : "s"}, in effect now.`, "ok");
  }

  // ---- clip

  async uploadClip() {
    const e = this.el;
    const file = e.clipFile.files[0];
    if (!file) {
      say(e.clipStatus, "Choose an audio file first.", "error");
      return;
    }
    const form = new FormData();
    form.append("clip", file, file.name);
    const prompt = e.clipPrompt.value.trim();
    if (prompt) form.append("prompt", prompt);
    e.clipSend.disabled = true;
    say(e.clipStatus, `Uploading and encoding “${file.name}”…`, "busy");
    const answer = await this.call("POST", "/clip", { form }, e.clipStatus);
    e.clipSend.disabled = false;
    if (!answer) return;
    if (!answer.ok) {
      say(e.clipStatus, `Not used: ${reason(answer)}.`, "error");
      return;
    }
    const b = answer.body;
    const heard = typeof b.heard_in_seconds === "number" ? `, on the air in ${b.heard_in_seconds.toFixed(1)} s` : "";
    say(
      e.clipStatus,
      `The station now continues from the clip (${b.clip.seconds.toFixed(1)} s) with “${b.prompt}”${heard}.`,
      "ok",
    );
    e.clipForm.reset();
  }

  // ---- pin

  async pin() {
    const e = this.el;
    const text = e.pinPrompt.value.trim();
    if (!text) {
      say(e.pinStatus, "Type the prompt to pin first.", "error");
      return;
    }
    if (e.pinMinutes.validity.badInput) {
      say(e.pinStatus, "Minutes: not a number.", "error");
      return;
    }
    const body = { prompt: parsePromptLine(text) };
    if (e.pinMinutes.value !== "") body.minutes = Number(e.pinMinutes.value);
    e.pinSend.disabled = true;
    const answer = await this.call("POST", "/pin", { json: body }, e.pinStatus);
    e.pinSend.disabled = false;
    if (!answer) return;
    if (!answer.ok) {
      say(e.pinStatus, `Not pinned: ${reason(answer)}.`, "error");
      return;
    }
    say(e.pinStatus, `Pinned “${answer.body.prompt}”: nothing else changes the music until it ends.`, "ok");
    e.pinForm.reset();
  }

  async unpin() {
    const answer = await this.call("DELETE", "/pin", {}, this.el.pinStatus);
    if (!answer) return;
    if (answer.ok) say(this.el.pinStatus, "Unpinned: the schedule resumes.", "ok");
    else say(this.el.pinStatus, `Not unpinned: ${reason(answer)}.`, "error");
  }

  // ---- the queue (buttons drawn by the queue card, messages in its status line)

  /** Remove suggestion `s`; says what happened through `tell(text, kind)`. */
  async removeSuggestion(s, tell) {
    const answer = await this.call("DELETE", `/suggestions/${encodeURIComponent(s.id)}`, {}, null);
    if (!answer) tell("Could not reach the radio.", "error");
    else if (answer.ok) tell(`Removed “${s.text}”.`, "ok");
    else tell(`Not removed: ${reason(answer)}.`, "error");
  }

  /** Clear the queue; says what happened through `tell(text, kind)`. */
  async clearQueue(tell) {
    const answer = await this.call("DELETE", "/suggestions", {}, null);
    if (!answer) tell("Could not reach the radio.", "error");
    else if (answer.ok) tell(`Queue cleared (${answer.body.removed} removed).`, "ok");
    else tell(`Not cleared: ${reason(answer)}.`, "error");
  }
}

function say(node, text, kind) {
  if (!node) return;
  node.textContent = text;
  node.className = `admin-status ${kind}`;
}
