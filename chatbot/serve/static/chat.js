"use strict";
// Protocol v1 client (docs/protocol.md).  The session id lives in localStorage so a reload or a
// dropped connection resumes the same conversation; unanswered messages are re-sent with their
// original message_id, which the server de-duplicates.  When the session has expired on the server,
// the page starts a new one, says so, and sends the unanswered messages again there.
// A static file, not an inline script: the page's Content-Security-Policy allows no inline code.
const PROTOCOL_VERSION = 1;
const SESSION_KEY = "chatbot.session_id";
const MAX_RETRIES = 5;
const $ = (id) => document.getElementById(id);
const messages = $("messages"), input = $("input"), send = $("send"), statusEl = $("status");

let ws = null, sessionId = localStorage.getItem(SESSION_KEY), ready = false, reconnectDelay = 500;
let pingTimer = null;
let expired = false;  // the session we held expired; the next session frame is its replacement
const outbox = new Map();   // message_id -> {text, retries}: sent but not yet answered
const bubbles = new Map();  // message_id -> bot bubble element

function newId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function setStatus(text) { statusEl.textContent = text; }

function addTurn(role, text) {
  const el = document.createElement("div");
  el.className = "turn " + role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  el.appendChild(body);
  messages.appendChild(el);
  messages.scrollTop = messages.scrollHeight;
  return el;
}

function showSources(el, sources) {
  const meta = document.createElement("div");
  meta.className = "meta";
  if (!sources || sources.length === 0) {
    meta.textContent = "sources: none";
    el.appendChild(meta);
    return;
  }
  meta.textContent = "sources:";
  const list = document.createElement("ol");
  list.className = "sources";
  for (const s of sources) {
    const item = document.createElement("li");
    const label = s.title || s.id || JSON.stringify(s);
    if (s.url && /^https?:\/\//.test(s.url)) {
      const a = document.createElement("a");
      a.href = s.url; a.textContent = label; a.rel = "noopener noreferrer"; a.target = "_blank";
      item.appendChild(a);
    } else {
      item.textContent = label;
    }
    list.appendChild(item);
  }
  el.appendChild(meta);
  el.appendChild(list);
}

function finishBubble(el, text, sources, latencyMs) {
  el.querySelector(".text").textContent = text;
  el.dataset.state = "done";
  showSources(el, sources);
  if (latencyMs != null) {
    const meta = document.createElement("div");
    meta.className = "meta latency";
    meta.textContent = Math.round(latencyMs) + " ms";
    el.appendChild(meta);
  }
}

function addNotice(text) {
  const el = document.createElement("div");
  el.className = "notice";
  el.textContent = text;
  messages.appendChild(el);
  return el;
}

function renderHistory(history) {
  messages.replaceChildren();
  bubbles.clear();
  if (expired && outbox.size) {
    addNotice("Your previous conversation expired, so a new one started. Unanswered messages were sent again.");
  } else if (expired) {
    addNotice("Your previous conversation expired, so a new one started.");
  }
  for (const turn of history) {
    if (turn.role === "user") {
      addTurn("user", turn.text).dataset.messageId = turn.message_id;
    } else {
      const el = addTurn("bot", "");
      el.dataset.messageId = turn.message_id;
      finishBubble(el, turn.text, turn.sources, turn.latency_ms);
    }
  }
  // Messages we sent that the history does not answer yet keep their bubbles and are re-sent.
  for (const turn of history) if (turn.role === "bot") outbox.delete(turn.message_id);
  for (const [mid, item] of outbox) {
    if (!history.some((t) => t.role === "user" && t.message_id === mid)) addTurn("user", item.text);
    const el = addTurn("bot", "");
    el.dataset.messageId = mid;
    el.dataset.state = "waiting";
    bubbles.set(mid, el);
  }
}

function sendFrame(frame) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
}

function sendMessage(mid) {
  const item = outbox.get(mid);
  if (item && ready) sendFrame({ type: "message", message_id: mid, text: item.text });
}

// The stored conversation is gone (expired, or never existed): start a new session and keep every
// unanswered message in the outbox, so the new session's frame sends them again.
function startOver() {
  localStorage.removeItem(SESSION_KEY);
  const hadSession = sessionId !== null;
  sessionId = null;
  expired = hadSession;
  for (const item of outbox.values()) item.retries = 0;
  if (ready) {
    // A connection carries one session: a fresh connection says hello without the old id.
    ready = false;
    ws.onclose = null;
    ws.onmessage = null;
    ws.close();
    connect();
  } else {
    sendFrame({ type: "hello", version: PROTOCOL_VERSION });
  }
}

function onError(frame) {
  const mid = frame.message_id;
  if (frame.code === "unknown_session" || frame.code === "invalid_session_id") {
    if (sessionId !== null) startOver();  // once, however many messages report it
    return;
  }
  if (!mid) {
    setStatus("error: " + frame.message);
    return;
  }
  const item = outbox.get(mid), el = bubbles.get(mid);
  if (frame.retryable && item && item.retries < MAX_RETRIES) {
    item.retries += 1;
    const delay = frame.retry_after_ms || 500 * 2 ** item.retries;
    if (el) {
      el.dataset.state = "waiting";
      el.querySelector(".text").textContent = "";  // the retry streams the reply from its start
      delete el.dataset.pieces;
    }
    setTimeout(() => sendMessage(mid), delay);
    return;
  }
  outbox.delete(mid);
  if (el) {
    el.dataset.state = "error";
    el.querySelector(".text").textContent = "";
    const msg = document.createElement("div");
    msg.className = "error";
    msg.textContent = frame.code + ": " + frame.message;
    el.appendChild(msg);
  }
}

function onFrame(frame) {
  switch (frame.type) {
    case "session":
      sessionId = frame.session_id;
      localStorage.setItem(SESSION_KEY, sessionId);
      ready = true;
      reconnectDelay = 500;
      send.disabled = false;
      input.maxLength = frame.limits.max_text_chars;
      setStatus(frame.resumed ? "resumed conversation"
                : expired ? "previous conversation expired; new conversation" : "new conversation");
      renderHistory(frame.history);
      expired = false;
      for (const mid of outbox.keys()) sendMessage(mid);
      break;
    case "accepted":
      break;
    case "piece": {
      const el = bubbles.get(frame.message_id);
      if (!el) break;
      el.dataset.state = "streaming";
      el.dataset.pieces = String(Number(el.dataset.pieces || 0) + 1);
      el.querySelector(".text").textContent += frame.text;
      messages.scrollTop = messages.scrollHeight;
      break;
    }
    case "reply": {
      outbox.delete(frame.message_id);
      const el = bubbles.get(frame.message_id);
      bubbles.delete(frame.message_id);
      // The final frame's text is authoritative: it is what the stored history holds.
      if (el) finishBubble(el, frame.text, frame.sources, frame.latency_ms);
      break;
    }
    case "error":
      onError(frame);
      break;
    case "pong":
      break;
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(scheme + "://" + location.host + "/ws");
  ready = false;
  send.disabled = true;
  ws.onopen = () => {
    setStatus("connected");
    const hello = { type: "hello", version: PROTOCOL_VERSION };
    if (sessionId) hello.session_id = sessionId;
    sendFrame(hello);
    clearInterval(pingTimer);
    pingTimer = setInterval(() => sendFrame({ type: "ping" }), 20000);
  };
  ws.onmessage = (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    onFrame(frame);
  };
  ws.onclose = (event) => {
    ready = false;
    send.disabled = true;
    clearInterval(pingTimer);
    setStatus((event.code === 1001 ? "server restarting" : "disconnected") + "; reconnecting…");
    setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 10000);
  };
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || !ready) return;
  input.value = "";
  const mid = newId();
  outbox.set(mid, { text, retries: 0 });
  addTurn("user", text).dataset.messageId = mid;
  const el = addTurn("bot", "");
  el.dataset.messageId = mid;
  el.dataset.state = "waiting";
  bubbles.set(mid, el);
  sendMessage(mid);
});

$("new").addEventListener("click", () => {
  localStorage.removeItem(SESSION_KEY);
  sessionId = null;
  outbox.clear();
  messages.replaceChildren();
  if (ws) ws.close();  // onclose reconnects with a hello that starts a new session
});

connect();
