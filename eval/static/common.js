// Shared by the rating and admin pages.  Untrusted text (contexts, responses, names) only ever goes
// through textContent: nothing from the server becomes markup.
"use strict";

const ssa = {
  csrf: null,

  async api(method, path, body) {
    const options = { method, headers: {}, credentials: "same-origin" };
    if (method !== "GET") {
      options.headers["Content-Type"] = "application/json";
      options.headers["X-CSRF-Token"] = ssa.csrf || "";
      options.body = JSON.stringify(body || {});
    }
    const response = await fetch(path, options);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const error = new Error((data && data.message) || ("HTTP " + response.status));
      error.code = data && data.error;
      error.status = response.status;
      throw error;
    }
    return data;
  },

  el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  },

  show(id, visible) {
    document.getElementById(id).hidden = !visible;
  },

  message(text) {
    document.getElementById("message").textContent = text || "";
  },

  // Sign in (or resume a signed-in session); resolves to the session's role.
  async signIn(tokenInput) {
    const login = await ssa.api("GET", "/api/csrf");
    ssa.csrf = login.csrf;
    const session = await ssa.api("POST", "/api/login", { token: tokenInput.value });
    ssa.csrf = session.csrf;
    tokenInput.value = "";
    return session.role;
  },

  async resume() {
    try {
      const session = await ssa.api("GET", "/api/me");
      ssa.csrf = session.csrf;
      return session.role;
    } catch (e) {
      return null;
    }
  },
};
