/* Live news of one station over Server-Sent Events (GET /api/stations/{id}/events).
 *
 * The server sends a `station` snapshot on connect, then `prompt`, `listeners`, `health`,
 * `programme` (what plays and why, what comes next, today's schedule, the queue) and `queue`
 * (suggestions with votes, the skip tally) events.
 * The browser reconnects by itself after a network error; when it gives up (an HTTP error),
 * this retries with a growing delay. `onReconnect` runs after every reconnection so the page
 * can fetch what it may have missed.
 */

import { stationUrl } from "./api.js";

export class LiveEvents {
  /** handlers: {prompt(data), listeners(data), health(data), programme(data), queue(data),
   *  onState("live"|"reconnecting"), onReconnect()} */
  constructor(handlers) {
    this.handlers = handlers;
    this.source = null;
    this.retries = 0;
    this.timer = 0;
  }

  connect(stationId) {
    this.close();
    const es = new EventSource(`${stationUrl(stationId)}/events`);
    this.source = es;
    let opened = false;
    es.onopen = () => {
      if (opened || this.retries > 0) this.handlers.onReconnect();
      opened = true;
      this.retries = 0;
      this.handlers.onState("live");
    };
    es.onerror = () => {
      this.handlers.onState("reconnecting");
      if (es.readyState !== EventSource.CLOSED) return; // the browser retries by itself
      const delay = Math.min(30000, 1000 * 2 ** this.retries++);
      this.timer = setTimeout(() => {
        if (this.source === es) this.connect(stationId);
      }, delay);
    };
    for (const name of ["station", "prompt", "listeners", "health", "programme", "queue"]) {
      es.addEventListener(name, (e) => {
        if (this.source !== es) return; // a late event of a station no longer shown
        let data;
        try {
          data = JSON.parse(e.data);
        } catch {
          return;
        }
        const handler = this.handlers[name === "station" ? "prompt" : name];
        if (data && handler) handler(data);
      });
    }
  }

  close() {
    clearTimeout(this.timer);
    if (this.source) this.source.close();
    this.source = null;
  }
}
