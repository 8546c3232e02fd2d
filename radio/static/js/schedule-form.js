/* The admin's schedule editor: a station's programme settings (GET /api/stations/{id}/schedule,
 * `programme`) as a form, one fieldset per slot, and back into the JSON that
 * PUT /api/stations/{id}/schedule takes. The radio checks it exactly like config.toml; this only
 * turns fields into values (a prompt line into a text or a blend, checked days into a list) and
 * leaves every rule (times, overlaps, ranges) to the server, whose reason the page shows.
 *
 * A prompt line is a text, or a blend written `warm jazz trio @ 0.7 | rain on a window @ 0.3`.
 */

export const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const DAY_LABELS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/** A number field left unreadable by the browser (e.g. "12abc"): named in the message. */
export class FormError extends Error {}

/** Day numbers (0 = mon) of a days value as the server writes it: "daily", "mon-fri",
 * "mon-wed,fri,sun" (ranges may wrap: "fri-mon"), or a list of such strings. */
export function dayNumbers(value) {
  const out = new Set();
  for (const item of Array.isArray(value) ? value : [value]) {
    for (const part of String(item).split(",")) {
      const p = part.trim().toLowerCase();
      if (p === "daily" || p === "every day") {
        DAYS.forEach((_, i) => out.add(i));
        continue;
      }
      const ends = p.split("-").map((s) => DAYS.indexOf(s.trim()));
      const [a, b] = [ends[0], ends[ends.length - 1]];
      if (ends.length > 2 || a < 0 || b < 0) continue;
      for (let i = 0; i <= (b - a + 7) % 7; i++) out.add((a + i) % 7);
    }
  }
  return out;
}

/** A prompt value (a text, or a blend [{text, weight}]) as one line of the prompts box. */
export function promptLine(value) {
  if (typeof value === "string") return value;
  return value.map((p) => `${p.text} @ ${+p.weight.toFixed(3)}`).join(" | ");
}

/** One line of the prompts box as a prompt value: a text, or a blend when it holds `|` or
 * a weight (`text @ 0.7`). A part without a weight weighs 1. */
export function parsePromptLine(line) {
  const parts = line.split("|").map((p) => p.trim());
  const weighted = parts.map((p) => {
    const m = /^(.*?)\s*@\s*([0-9]*\.?[0-9]+)$/.exec(p);
    return m ? { text: m[1], weight: Number(m[2]) } : { text: p };
  });
  if (weighted.length === 1 && !("weight" in weighted[0])) return weighted[0].text;
  return weighted;
}

/** "Slot 2 (lunch)" for the server's `schedule[1]` in a reason, the slots it names marked. */
export function plainReason(reason) {
  return reason
    .replace(/schedule\[(\d+)\]\./g, (_, n) => `slot ${Number(n) + 1}, `)
    .replace(/schedule\[(\d+)\]/g, (_, n) => `slot ${Number(n) + 1}`);
}

/** Indexes of the slots a server reason names (`schedule[2]`). */
export function slotsNamed(reason) {
  return new Set([...reason.matchAll(/schedule\[(\d+)\]/g)].map((m) => Number(m[1])));
}

const STATION_KEYS = [
  "timezone",
  "transition_seconds",
  "listener_prompts",
  "listener_hold_minutes",
  "skip_threshold",
  "skip_minimum",
];
const NUMBERS = new Set(["transition_seconds", "listener_hold_minutes", "skip_threshold", "skip_minimum"]);

export class ScheduleForm {
  /** form: the <form> whose named inputs are the station's keys (`timezone`, ...);
   * slots: the element that holds one <fieldset> per slot. */
  constructor(form, slots) {
    this.form = form;
    this.slots = slots;
    this.serial = 0; // unique ids for the slots' labels
    const zones = form.querySelector("datalist#timezones");
    if (zones && typeof Intl.supportedValuesOf === "function") {
      zones.replaceChildren(...Intl.supportedValuesOf("timeZone").map((z) => new Option(z)));
    }
  }

  /** Fill the form from a `programme` object (GET .../schedule). */
  show(programme) {
    for (const key of STATION_KEYS) {
      const input = this.form.elements.namedItem(key);
      if (input) input.value = String(programme[key] ?? "");
    }
    this.slots.replaceChildren(...(programme.schedule || []).map((s) => this.slotFieldset(s)));
    this.renumber();
  }

  /** Append an empty slot and return it. */
  addSlot() {
    const fs = this.slotFieldset({ days: "daily", start: "", end: "", prompts: [] });
    this.slots.append(fs);
    this.renumber();
    return fs;
  }

  /** The JSON body of PUT .../schedule; FormError for a number field the browser could not read. */
  read() {
    const out = {};
    for (const key of STATION_KEYS) {
      const input = this.form.elements.namedItem(key);
      if (!input) continue;
      out[key] = NUMBERS.has(key) ? number(input, key, undefined) : input.value.trim();
      if (out[key] === undefined) delete out[key];
    }
    out.schedule = [...this.slots.children].map((fs, i) => readSlot(fs, `slot ${i + 1}`));
    return out;
  }

  /** Mark the slots a server reason names (and unmark the others). */
  markInvalid(indexes) {
    [...this.slots.children].forEach((fs, i) => {
      fs.classList.toggle("invalid", indexes.has(i));
      fs.setAttribute("aria-invalid", String(indexes.has(i)));
    });
  }

  renumber() {
    [...this.slots.children].forEach((fs, i) => {
      const name = fs.querySelector("[data-key=name]").value.trim();
      fs.querySelector("legend").textContent = `Slot ${i + 1}${name ? ` (${name})` : ""}`;
      fs.querySelector("button.remove-slot").textContent = `Remove slot ${i + 1}`;
    });
  }

  slotFieldset(slot) {
    const id = `slot${++this.serial}`;
    const fs = document.createElement("fieldset");
    fs.className = "slot";
    const legend = document.createElement("legend");
    const grid = document.createElement("div");
    grid.className = "slot-grid";
    const name = field(grid, `${id}-name`, "Name", input("text", slot.name || "", "name"));
    name.addEventListener("input", () => this.renumber());
    field(grid, `${id}-start`, "Start", timeInput(slot.start, "start"));
    const end = field(grid, `${id}-end`, "End (optional)", timeInput(slot.end, "end"));
    end.placeholder = "next slot";
    grid.append(daysFieldset(id, dayNumbers(slot.days ?? "daily")));
    const prompts = document.createElement("textarea");
    prompts.rows = 3;
    prompts.dataset.key = "prompts";
    prompts.value = (slot.prompts || []).map(promptLine).join("\n");
    field(grid, `${id}-prompts`, "Prompts, one per line", prompts).parentElement.classList.add("wide");
    const rotate = input("number", slot.rotate_minutes ? String(slot.rotate_minutes) : "", "rotate_minutes");
    Object.assign(rotate, { min: "0", max: "1440", step: "any", placeholder: "0 = never" });
    field(grid, `${id}-rotate`, "Rotate every (minutes)", rotate);
    const order = document.createElement("select");
    order.dataset.key = "order";
    order.append(new Option("in the order written", "listed"), new Option("shuffled", "shuffled"));
    order.value = slot.order || "listed";
    field(grid, `${id}-order`, "Order", order);
    const glide = slot.transition_seconds;
    const t = input("number", glide === undefined || glide === -1 ? "" : String(glide), "transition_seconds");
    Object.assign(t, { min: "0", max: "300", step: "any", placeholder: "the station's" });
    field(grid, `${id}-glide`, "Transition (s)", t);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove-slot admin-button";
    remove.addEventListener("click", () => {
      const next = fs.nextElementSibling || fs.previousElementSibling;
      fs.remove();
      this.renumber();
      (next?.querySelector("input") || this.form.querySelector("#slot-add"))?.focus();
    });
    fs.append(legend, grid, remove);
    return fs;
  }
}

function input(type, value, key) {
  const el = document.createElement("input");
  el.type = type;
  el.value = value;
  el.dataset.key = key;
  el.autocomplete = "off";
  return el;
}

function timeInput(value, key) {
  // text, not type=time: "24:00" is a valid end, and a bad time gets the server's words
  const el = input("text", value || "", key);
  Object.assign(el, { inputMode: "numeric", placeholder: "HH:MM", size: 5, maxLength: 5 });
  el.spellcheck = false;
  return el;
}

/** A <label> + control in `grid`; returns the control. */
function field(grid, id, text, control) {
  const wrap = document.createElement("div");
  wrap.className = "field";
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = text;
  control.id = id;
  wrap.append(label, control);
  grid.append(wrap);
  return control;
}

function daysFieldset(id, days) {
  const fs = document.createElement("fieldset");
  fs.className = "days wide";
  const legend = document.createElement("legend");
  legend.textContent = "Days";
  fs.append(legend);
  DAYS.forEach((day, i) => {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = day;
    box.checked = days.has(i);
    box.id = `${id}-${day}`;
    label.append(box, ` ${DAY_LABELS[i]}`);
    fs.append(label);
  });
  return fs;
}

function readSlot(fs, where) {
  const get = (key) => fs.querySelector(`[data-key=${key}]`);
  const slot = {
    name: get("name").value.trim(),
    days: [...fs.querySelectorAll(".days input:checked")].map((b) => b.value),
    start: get("start").value.trim(),
    end: get("end").value.trim(),
    prompts: get("prompts")
      .value.split("\n")
      .map((line) => line.trim())
      .filter(Boolean)
      .map(parsePromptLine),
    rotate_minutes: number(get("rotate_minutes"), `${where}, rotate every`, 0),
    order: get("order").value,
    transition_seconds: number(get("transition_seconds"), `${where}, transition`, -1),
  };
  return slot;
}

/** The number in a type=number input; `empty` when it is empty; FormError when unreadable. */
function number(el, where, empty) {
  if (el.validity.badInput) throw new FormError(`${where}: not a number`);
  return el.value.trim() === "" ? empty : Number(el.value);
}
