// The demo page's script: one request at a time through the frontend helper. For tests and the curious, the
// last request's numbers are kept in `window.signalboxDemo` (frames painted, deltas received, the result).
import { stream } from "/signalbox/v1/client.js";

const $ = (id) => document.getElementById(id);
const state = { current: null, frames: 0, deltas: 0, reconnects: 0, result: null };
window.signalboxDemo = state;

function status(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

function log(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("log").append(item);
}

function busy(on) {
  $("send").disabled = on;
  $("cancel").disabled = !on;
  $("drop").disabled = !on;
}

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("answer").textContent = "";
  $("log").replaceChildren();
  Object.assign(state, { frames: 0, deltas: 0, reconnects: 0, result: null });
  const headers = {};
  if ($("tokens").value) headers["x-mock-output-tokens"] = $("tokens").value;
  if ($("delay").value) headers["x-mock-token-delay-ms"] = $("delay").value;
  const controller = new AbortController();
  const s = stream({
    key: $("key").value.trim(),
    transport: $("transport").value,
    body: { model: $("model").value.trim(), messages: [{ role: "user", content: $("prompt").value }] },
    headers,
    signal: controller.signal,
    onText: (delta, text) => { state.frames += 1; $("answer").textContent = text; },
    onEvent: (e) => {
      if (e.type === "queued") status(`queued (position ${e.position ?? "?"})`, "queued");
      else if (e.type === "usage") log(`usage: ${e.input_tokens} in, ${e.output_tokens} out`);
      else if (e.type === "error") log(`error ${e.error.status}: ${e.error.message}`);
    },
    onReconnect: ({ attempt, after, delay }) => {
      state.reconnects += 1;
      status("resuming…", "resuming");
      log(`connection dropped: resuming after event ${after} in ${delay} ms (attempt ${attempt})`);
    },
  });
  state.current = { stream: s, controller };
  busy(true);
  status("streaming", "streaming");
  const result = await s.done;
  state.result = result;
  state.deltas = result.textEvents;
  busy(false);
  $("answer").textContent = result.text;
  if (result.resumes) log(`resumed ${result.resumes} time(s) on stream ${result.streamId}`);
  const kind = result.finishReason === "error" ? "error" : "done";
  status(result.error ? `${result.finishReason}: ${result.error.message}` : result.finishReason, kind);
});

$("cancel").addEventListener("click", () => state.current && state.current.controller.abort());
$("drop").addEventListener("click", () => {
  if (!state.current) return;
  log("dropping the connection");
  state.current.stream.drop();
});
