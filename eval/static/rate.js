// The rater's page: one item at a time, keyboard shortcuts, progress, undo, interactive sessions.
"use strict";

let current = null;   // the item on screen
let step = null;      // "sensible" or "specific" while an item is shown
let busy = false;     // a request is in flight: keys and clicks wait (no double submits)

function render(state) {
  const progress = state.progress;
  ssa.show("progress-box", true);
  const bar = document.getElementById("progress");
  bar.max = Math.max(progress.total, 1);
  bar.value = progress.done;
  document.getElementById("progress-text").textContent = progress.done + " / " + progress.total + " rated";
  document.getElementById("undo").disabled = !state.can_undo;
  document.getElementById("undo-done").disabled = !state.can_undo;
  ssa.show("signin", false);
  ssa.show("rating", false);
  ssa.show("chat", false);
  ssa.show("done", false);
  current = null;
  step = null;
  if (state.chat) {
    renderChat(state.chat);
  } else if (state.item) {
    renderItem(state.item);
  } else {
    ssa.show("done", true);
  }
}

function renderItem(item) {
  current = item;
  const context = document.getElementById("context");
  context.replaceChildren();
  // Speakers alternate; the response's speaker is B, so the turn before it is A's.
  const first = item.context.length % 2 === 0 ? 1 : 0;
  item.context.forEach((text, i) => {
    const li = ssa.el("li", null, "turn");
    li.append(ssa.el("span", ((i + first) % 2 === 0 ? "A" : "B") + ": ", "speaker"), ssa.el("span", text, "text"));
    context.append(li);
  });
  const response = document.getElementById("response");
  response.replaceChildren(ssa.el("span", "B: ", "speaker"), ssa.el("span", item.response, "text"));
  document.getElementById("rating").dataset.itemId = item.id;
  setStep("sensible");
  ssa.show("rating", true);
  // The keys answer the item: leave the (now hidden) token box.
  if (document.activeElement && document.activeElement.tagName === "INPUT") document.activeElement.blur();
}

function setStep(name) {
  step = name;
  ssa.show("q-specific", name === "specific");
  document.getElementById("q-sensible").classList.toggle("answered", name === "specific");
  document.getElementById("rating").dataset.step = name;
}

async function call(method, path, body) {
  if (busy) return;
  busy = true;
  ssa.message("");
  try {
    render(await ssa.api(method, path, body));
  } catch (e) {
    if (e.status === 401) {
      showSignIn("Please sign in again.");
    } else {
      ssa.message(e.message);
      if (e.code === "not_assigned" || e.code === "already_answered") await refresh();
    }
  } finally {
    busy = false;
  }
}

async function refresh() {
  render(await ssa.api("GET", "/api/next"));
}

function submit(sensible, specific) {
  if (!current) return;
  return call("POST", "/api/answer", { item_id: current.id, sensible: sensible, specific: specific });
}

function onYes() {
  if (step === "sensible") setStep("specific");
  else if (step === "specific") submit(true, true);
}

function onNo() {
  if (step === "sensible") submit(false, false);
  else if (step === "specific") submit(true, false);
}

function undo() {
  return call("POST", "/api/undo", {});
}

function renderChat(chat) {
  document.getElementById("chat-turns").textContent = String(chat.turns);
  const log = document.getElementById("chat-log");
  log.replaceChildren();
  chat.history.forEach((text, i) => {
    const li = ssa.el("li", null, "turn " + (i % 2 === 0 ? "you" : "bot"));
    li.append(ssa.el("span", (i % 2 === 0 ? "You" : "Bot") + ": ", "speaker"), ssa.el("span", text, "text"));
    log.append(li);
  });
  const input = document.getElementById("chat-input");
  input.value = chat.history.length === 0 ? "Hi!" : "";
  ssa.show("chat", true);
  input.focus();
}

async function sendChat(event) {
  event.preventDefault();
  const input = document.getElementById("chat-input");
  const text = input.value.trim();
  if (!text || busy) return;
  document.getElementById("chat-send").disabled = true;
  ssa.message("The bot is replying...");
  await call("POST", "/api/chat", { text: text });
  document.getElementById("chat-send").disabled = false;
}

function onKey(event) {
  if (event.target && (event.target.tagName === "INPUT" || event.target.tagName === "TEXTAREA")) return;
  if (event.ctrlKey || event.metaKey || event.altKey || busy) return;
  const key = event.key.toLowerCase();
  if (key === "u") { event.preventDefault(); undo(); return; }
  if (!current) return;
  if (key === "y" || key === "1") { event.preventDefault(); onYes(); }
  else if (key === "n" || key === "2") { event.preventDefault(); onNo(); }
  else if (key === "escape") { event.preventDefault(); setStep("sensible"); }
}

function showSignIn(text) {
  ssa.show("rating", false);
  ssa.show("chat", false);
  ssa.show("done", false);
  ssa.show("signin", true);
  ssa.message(text || "");
  document.getElementById("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  try {
    const role = await ssa.signIn(document.getElementById("token"));
    if (role !== "rater") { ssa.message("That is the admin token: the admin page is /admin."); return; }
    await refresh();
  } catch (e) {
    ssa.message(e.message);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("signin").addEventListener("submit", signIn);
  document.getElementById("sensible-yes").addEventListener("click", onYes);
  document.getElementById("sensible-no").addEventListener("click", onNo);
  document.getElementById("specific-yes").addEventListener("click", onYes);
  document.getElementById("specific-no").addEventListener("click", onNo);
  document.getElementById("undo").addEventListener("click", undo);
  document.getElementById("undo-done").addEventListener("click", undo);
  document.getElementById("chat-form").addEventListener("submit", sendChat);
  document.addEventListener("keydown", onKey);
  const role = await ssa.resume();
  if (role === "rater") {
    try { await refresh(); } catch (e) { showSignIn(e.message); }
  } else {
    showSignIn();
  }
});
