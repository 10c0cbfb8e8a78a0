// Signalbox stream client: the unified event stream (docs/apps/unified-stream.md) in a browser.
// Served by the proxy at GET /signalbox/v1/client.js; no dependencies, no build step (docs/apps/frontend.md).
//
//   import { stream } from "/signalbox/v1/client.js";
//   const s = stream({ key, body: { model: "mock-chat", messages: [...] },
//                      onText: (delta, text) => { answer.textContent = text; } });
//   cancelButton.onclick = () => s.cancel();
//   const result = await s.done;   // { text, finishReason, usage, toolCalls, resumes, ... }
//
// Over SSE it POSTs with fetch and parses the body itself (EventSource cannot send a body or headers); over a
// WebSocket it names the key in the `signalbox.bearer.<key>` subprotocol. A dropped connection is resumed from
// the last event's `seq` when the route keeps its streams (`stream.resumable`), with bounded retries and backoff.

/**
 * One event of the unified stream (see docs/apps/unified-stream.md#events).
 * @typedef {{type: string, seq: number, id?: string, text?: string, finish_reason?: string,
 *            error?: StreamErrorBody, stream_id?: string, [field: string]: unknown}} StreamEvent
 */
/**
 * @typedef {{status: number, type: string, code: (string|null), message: string, param: (string|null),
 *            retry_after: (number|null)}} StreamErrorBody
 */
/**
 * @typedef {Object} RetryOptions
 * @property {number} [attempts]   reconnects tried in a row before giving up (default 5)
 * @property {number} [baseDelay]  milliseconds before the first reconnect, doubled each time (default 250)
 * @property {number} [maxDelay]   the longest wait between two reconnects, in milliseconds (default 4000)
 */
/**
 * @typedef {Object} StreamOptions
 * @property {string} [baseUrl]    the proxy's origin (default: this page's origin)
 * @property {string} [key]        the tenant's API key (a browser key of its own, with its own limits)
 * @property {"sse"|"ws"} [transport]  default "sse"
 * @property {string} [path]       the target API: /v1/chat/completions (default), /v1/responses, /v1/messages
 * @property {Object} body         the request body as that API takes it
 * @property {Record<string, string>} [headers]  extra request headers (e.g. x-signalbox-priority)
 * @property {AbortSignal} [signal]  aborting it cancels the request (as cancel() does)
 * @property {(delta: string, text: string) => void} [onText]  at most once per animation frame: the text that
 *           arrived since the last call, and the whole text so far
 * @property {(event: StreamEvent) => void} [onEvent]  every event except text_delta, as it arrives
 * @property {(info: {attempt: number, after: number, delay: number}) => void} [onReconnect]  before each resume
 * @property {RetryOptions} [retry]
 * @property {(fn: () => void) => unknown} [schedule]  the frame scheduler (default requestAnimationFrame)
 */
/**
 * @typedef {Object} StreamResult
 * @property {string} text            the whole answer's text
 * @property {string} finishReason    stop, length, tool_calls, content_filter, cancelled or error
 * @property {Object|null} usage      the usage event's tokens, if any
 * @property {Array<{index: number, call_id: string, name: string, arguments: string}>} toolCalls
 * @property {StreamErrorBody|null} error
 * @property {number} events          events received (each seq once)
 * @property {number} textEvents      text_delta events among them (onText ran once per frame, not per delta)
 * @property {number} repeated        events that came again (a seq already seen) and were dropped: 0 from a
 *           proxy that resumes exactly after the last seq
 * @property {number} resumes         connections resumed after a drop
 * @property {string|null} streamId   the stream's id when the route keeps its streams for a resume
 */

export const STREAM_PATH = "/signalbox/v1/stream";
const WS_PROTOCOL = "signalbox.v1";
const BEARER_PROTOCOL = "signalbox.bearer.";
const STREAM_ID_HEADER = "x-signalbox-stream-id";
const CANCEL_GRACE_MS = 5000;

/** A request that ended without its `stream_complete`, or was refused (`body` in the proxy's error shape). */
export class StreamError extends Error {
  /** @param {string} message @param {StreamErrorBody|null} body */
  constructor(message, body) {
    super(message);
    this.name = "StreamError";
    /** @type {StreamErrorBody|null} */
    this.body = body;
  }
}

/**
 * Server-sent events from text chunks (the WHATWG event-stream grammar: CRLF, LF or CR line ends, comment
 * lines, several data lines joined by "\n", `id` and `event` fields). `push` returns the events completed.
 */
export class SSEParser {
  constructor() {
    this.buffer = "";
    /** @type {string[]} */
    this.data = [];
    this.event = "";
    this.id = null;
  }

  /**
   * @param {string} chunk
   * @returns {Array<{event: string, data: string, id: (string|null)}>}
   */
  push(chunk) {
    this.buffer += chunk;
    const out = [];
    for (;;) {
      const end = this.buffer.search(/\r\n|\r|\n/);
      if (end < 0) break;
      // A lone CR at the end of a chunk may be the first half of a CRLF: wait for the next chunk.
      if (this.buffer[end] === "\r" && end === this.buffer.length - 1) break;
      const width = this.buffer.startsWith("\r\n", end) ? 2 : 1;
      const line = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + width);
      const done = this.line(line);
      if (done) out.push(done);
    }
    return out;
  }

  /** @param {string} line */
  line(line) {
    if (line === "") {
      if (this.data.length === 0) { this.event = ""; return null; }
      const done = { event: this.event || "message", data: this.data.join("\n"), id: this.id };
      this.data = [];
      this.event = "";
      return done;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.id = value;
    return null;
  }
}

/**
 * Text deltas merged into one call per animation frame: however many arrive between two frames, `onText`
 * runs once with all of them. `flush` runs it now (at the end of a stream).
 */
export class FrameBatcher {
  /** @param {(delta: string, text: string) => void} onText @param {(fn: () => void) => unknown} schedule */
  constructor(onText, schedule) {
    this.onText = onText;
    this.schedule = schedule;
    this.text = "";
    this.pending = "";
    this.scheduled = false;
    this.frames = 0;
  }

  /** @param {string} delta */
  add(delta) {
    this.text += delta;
    this.pending += delta;
    if (!this.scheduled) {
      this.scheduled = true;
      this.schedule(() => { this.scheduled = false; this.flush(); });
    }
  }

  flush() {
    if (!this.pending) return;
    const delta = this.pending;
    this.pending = "";
    this.frames += 1;
    this.onText(delta, this.text);
  }
}

/** @returns {(fn: () => void) => unknown} */
function defaultSchedule() {
  if (typeof requestAnimationFrame === "function") return (fn) => requestAnimationFrame(fn);
  return (fn) => setTimeout(fn, 16);
}

/**
 * A network step's value, or null when the network failed or the connection was aborted (dropped, cancelled).
 * @template T @param {Promise<T>} step @returns {Promise<T|null>}
 */
async function network(step) {
  try {
    return await step;
  } catch (err) {
    if (err instanceof TypeError || (err instanceof DOMException && err.name === "AbortError")) return null;
    throw err;
  }
}

/** @param {number} ms @param {AbortSignal} signal */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() { clearTimeout(timer); signal.removeEventListener("abort", done); resolve(undefined); }
    signal.addEventListener("abort", done, { once: true });
  });
}

/**
 * Start one request on the unified stream.
 * @param {StreamOptions} options
 * @returns {Stream}
 */
export function stream(options) {
  return new Stream(options);
}

/** One request: its events in order (each seq once, across resumes), cancel(), and `done`. */
export class Stream {
  /** @param {StreamOptions} options */
  constructor(options) {
    this.options = options;
    this.transport = options.transport === "ws" ? "ws" : "sse";
    this.base = (options.baseUrl || globalThis.location.origin).replace(/\/$/, "");
    this.retry = { attempts: 5, baseDelay: 250, maxDelay: 4000, ...(options.retry || {}) };
    this.batcher = new FrameBatcher(options.onText || (() => {}), options.schedule || defaultSchedule());
    /** The seq of the last event received: a resume asks for the events after it. */
    this.lastSeq = -1;
    /** @type {string|null} */
    this.streamId = null;
    this.resumes = 0;
    this.cancelled = new AbortController();
    /** @type {(() => void)|null} what drop() does to the current connection */
    this.dropCurrent = null;
    /** @type {WebSocket|null} */
    this.socket = null;
    /** Did the current connection bring a new event? (Then a drop starts the retry count afresh.) */
    this.progressed = false;
    this.requestId = "r" + Math.random().toString(36).slice(2, 10);
    /** @type {StreamResult} */
    this.result = { text: "", finishReason: "", usage: null, toolCalls: [], error: null, events: 0, textEvents: 0,
                    repeated: 0, resumes: 0, streamId: null };
    if (options.signal) {
      if (options.signal.aborted) this.cancel();
      else options.signal.addEventListener("abort", () => this.cancel(), { once: true });
    }
    /** @type {Promise<StreamResult>} */
    this.done = this.run();
  }

  /** The text received so far (also between two frames). */
  get text() { return this.batcher.text; }

  /**
   * Stop the request: the proxy closes its upstream and frees its slot. Safe to call more than once. Over a
   * WebSocket: the `cancel` message. Over SSE: the fetch is aborted, and a resumable stream (which would go on
   * without its client) is stopped with DELETE.
   */
  cancel() {
    if (this.cancelled.signal.aborted) return;
    this.cancelled.abort();
    const ws = this.socket;
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "cancel", id: this.requestId }));
    } else if (this.streamId !== null) {
      /** @type {Record<string, string>} */
      const headers = { [STREAM_ID_HEADER]: this.streamId };
      if (this.options.key) headers.Authorization = "Bearer " + this.options.key;
      fetch(this.base + STREAM_PATH, { method: "DELETE", headers, keepalive: true }).catch(() => {});
    }
  }

  /** Cut the current connection as a network failure would (a demo of the resume, and a test hook). */
  drop() {
    if (this.dropCurrent) this.dropCurrent();
  }

  /** @returns {Promise<StreamResult>} */
  async run() {
    let failures = 0;
    for (;;) {
      let ended = false;
      this.progressed = false;
      try {
        ended = await (this.transport === "ws" ? this.connectSocket() : this.connectSSE());
      } catch (err) {
        if (err instanceof StreamError) return this.finish("error", err.body);
        throw err;
      }
      if (ended) return this.finish(this.result.finishReason, this.result.error);
      if (this.cancelled.signal.aborted) return this.finish("cancelled", null);
      // The connection dropped before stream_complete: resume from the last seq if the stream can be resumed.
      if (this.streamId === null) {
        return this.finish("error", lost(this.result.events === 0
          ? "the connection closed before any event (the network, or a WebSocket refused at the upgrade)"
          : "the connection dropped and this route does not keep its streams for a resume"));
      }
      failures = this.progressed ? 1 : failures + 1;
      if (failures > this.retry.attempts) {
        return this.finish("error", lost(`the connection dropped and ${this.retry.attempts} resumes failed`));
      }
      const delay = Math.min(this.retry.maxDelay, this.retry.baseDelay * 2 ** (failures - 1));
      if (this.options.onReconnect) this.options.onReconnect({ attempt: failures, after: this.lastSeq, delay });
      await sleep(delay, this.cancelled.signal);
      if (this.cancelled.signal.aborted) return this.finish("cancelled", null);
      this.resumes += 1;
    }
  }

  /** @param {string} reason @param {StreamErrorBody|null} error @returns {StreamResult} */
  finish(reason, error) {
    this.batcher.flush();
    const result = this.result;
    result.text = this.batcher.text;
    result.finishReason = result.finishReason || reason;
    result.error = result.error || error;
    result.resumes = this.resumes;
    result.streamId = this.streamId;
    return result;
  }

  /**
   * Take one event; true once it is the request's stream_complete. Events already seen (seq at or below the
   * last one) are dropped, so a resume never repeats text.
   * @param {StreamEvent} event
   */
  take(event) {
    if (typeof event.seq !== "number") return false;
    if (event.seq <= this.lastSeq) {
      this.result.repeated += 1;
      return false;
    }
    this.lastSeq = event.seq;
    this.progressed = true;
    this.result.events += 1;
    if (event.stream_id && !this.streamId) this.streamId = String(event.stream_id);
    switch (event.type) {
      case "text_delta":
        this.result.textEvents += 1;
        this.batcher.add(String(event.text || ""));
        return false;
      case "tool_call": {
        const calls = this.result.toolCalls;
        const index = Number(event.index);
        calls[index] = calls[index] || { index, call_id: String(event.call_id), name: String(event.name),
                                         arguments: "" };
        calls[index].arguments += String(event.arguments_delta || "");
        break;
      }
      case "usage":
        this.result.usage = { input_tokens: event.input_tokens, output_tokens: event.output_tokens,
                              total_tokens: event.total_tokens };
        break;
      case "error":
        this.result.error = event.error || null;
        break;
      case "stream_complete":
        this.result.finishReason = String(event.finish_reason);
        break;
      default:
        break;
    }
    this.batcher.flush();  // a non-text event is shown after the text before it
    if (this.options.onEvent) this.options.onEvent(event);
    return event.type === "stream_complete";
  }

  headers() {
    /** @type {Record<string, string>} */
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream",
                      ...(this.options.headers || {}) };
    if (this.options.key) headers.Authorization = "Bearer " + this.options.key;
    if (this.streamId !== null) {
      headers[STREAM_ID_HEADER] = this.streamId;
      headers["Last-Event-ID"] = String(this.lastSeq);
    }
    return headers;
  }

  /** One SSE connection: true when stream_complete came, false when the connection dropped before it. */
  async connectSSE() {
    const connection = new AbortController();
    const onCancel = () => connection.abort();
    this.cancelled.signal.addEventListener("abort", onCancel, { once: true });
    this.dropCurrent = () => connection.abort();
    try {
      const body = JSON.stringify({ path: this.options.path || "/v1/chat/completions", body: this.options.body });
      const response = await network(fetch(this.base + STREAM_PATH, {
        method: "POST", headers: this.headers(), body, signal: connection.signal, cache: "no-store" }));
      if (response === null) return false;
      if (response.status !== 200) throw await refusal(response);
      const named = response.headers.get(STREAM_ID_HEADER);
      if (named) this.streamId = named;
      if (!response.body) return false;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      const parser = new SSEParser();
      for (;;) {
        const chunk = await network(reader.read());
        if (chunk === null || chunk.done) return false;  // dropped (or cancelled): run() decides
        for (const block of parser.push(chunk.value)) {
          if (this.take(/** @type {StreamEvent} */ (JSON.parse(block.data)))) {
            await reader.cancel().catch(() => {});
            return true;
          }
        }
      }
    } finally {
      this.cancelled.signal.removeEventListener("abort", onCancel);
      this.dropCurrent = null;
    }
  }

  /** One WebSocket: the request (or its resume), its events; true when stream_complete came. */
  connectSocket() {
    const url = this.base.replace(/^http/, "ws") + STREAM_PATH;
    const protocols = [WS_PROTOCOL];
    if (this.options.key) protocols.push(BEARER_PROTOCOL + this.options.key);
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, protocols);
      this.socket = ws;
      let settled = false;
      /** @param {boolean} ended */
      const settle = (ended) => {
        if (settled) return;
        settled = true;
        this.socket = null;
        this.dropCurrent = null;
        clearTimeout(grace);
        ws.close(1000);
        resolve(ended);
      };
      let grace = 0;
      const onCancel = () => { grace = setTimeout(() => settle(false), CANCEL_GRACE_MS); };
      this.cancelled.signal.addEventListener("abort", onCancel, { once: true });
      this.dropCurrent = () => { ws.close(4000, "dropped"); settle(false); };
      ws.onopen = () => {
        if (this.cancelled.signal.aborted) { settle(false); return; }
        const message = this.streamId === null
          ? { type: "request", id: this.requestId, path: this.options.path || "/v1/chat/completions",
              body: this.options.body, headers: this.options.headers || {} }
          : { type: "resume", id: this.requestId, stream: this.streamId, after: this.lastSeq };
        ws.send(JSON.stringify(message));
      };
      ws.onmessage = (message) => {
        const event = /** @type {StreamEvent} */ (JSON.parse(String(message.data)));
        if (event.id !== this.requestId) {
          if (event.type === "error" && event.id === null && !settled) {
            settled = true;
            reject(new StreamError(event.error ? event.error.message : "refused", event.error || null));
          }
          return;
        }
        if (this.take(event)) settle(true);
      };
      ws.onclose = () => settle(false);
    });
  }
}

/** @param {string} message @returns {StreamErrorBody} */
function lost(message) {
  return { status: 0, type: "connection_lost", code: "connection_lost", message, param: null, retry_after: null };
}

/** A refused request's error body (the proxy's `{"type": "error", "error": {...}}`, or OpenAI's shape). */
async function refusal(response) {
  let body = null;
  try { body = await response.json(); } catch { body = null; }
  const error = body && typeof body === "object" && body.error && typeof body.error === "object" ? body.error : null;
  const retry = Number(response.headers.get("Retry-After"));
  const detail = {
    status: response.status, type: error ? String(error.type) : "http_error", code: error ? error.code ?? null : null,
    message: error ? String(error.message) : `HTTP ${response.status}`, param: error ? error.param ?? null : null,
    retry_after: error && error.retry_after != null ? error.retry_after : Number.isFinite(retry) && retry > 0 ? retry : null,
  };
  return new StreamError(detail.message, detail);
}
