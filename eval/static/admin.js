// The admin page: raters, sets, interactive sessions, progress and agreement.  Text via textContent only.
"use strict";

function fillTable(id, rows, columns) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  rows.forEach((row) => {
    const tr = document.createElement("tr");
    columns.forEach((column) => tr.append(ssa.el("td", row[column] === null || row[column] === undefined ? "" : row[column])));
    body.append(tr);
  });
}

function pct(value) {
  return value === null || value === undefined ? "n/a" : value.toFixed(3);
}

async function refresh() {
  const status = await ssa.api("GET", "/api/admin/status");
  fillTable("systems", status.systems, ["system", "items", "answers", "complete"]);
  fillTable("raters", status.raters, ["id", "name", "answers"]);
  fillTable("sets", status.sets, ["name", "kind", "items"]);
  fillTable("chats", status.chats.map((c) => ({ ...c, turns: c.history.length + " / " + c.turns })),
            ["rater_id", "system", "turns", "status"]);
  const a = status.agreement;
  document.getElementById("agreement").textContent = a
    ? "Agreement so far (" + a.items_with_2plus_raters + " items with 2+ raters): Krippendorff's alpha sensible "
      + pct(a.sensible.krippendorff_alpha) + ", specific " + pct(a.specific.krippendorff_alpha)
      + "; unanimous sensible " + pct(a.sensible.unanimous_share) + ", specific " + pct(a.specific.unanimous_share)
    : "No ratings yet.";
  const select = document.getElementById("chat-system");
  select.replaceChildren(...status.chat_systems.map((name) => ssa.el("option", name)));
  document.getElementById("chat-length").value = String(status.chat_turns || 14);
}

async function guarded(event, work) {
  event.preventDefault();
  ssa.message("");
  try {
    await work();
    await refresh();
  } catch (e) {
    ssa.message(e.message);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("signin").addEventListener("submit", (event) => guarded(event, async () => {
    const role = await ssa.signIn(document.getElementById("token"));
    if (role !== "admin") throw new Error("that is a rater token: raters use the page at /");
    ssa.show("signin", false);
    ssa.show("admin", true);
  }));
  document.getElementById("new-rater").addEventListener("submit", (event) => guarded(event, async () => {
    const input = document.getElementById("rater-name");
    const rater = await ssa.api("POST", "/api/admin/raters", { name: input.value });
    document.getElementById("new-token").textContent =
      "Rater " + rater.id + " created. Their token (shown only now): " + rater.token;
    input.value = "";
  }));
  document.getElementById("load-set").addEventListener("submit", (event) => guarded(event, async () => {
    const file = document.getElementById("set-file").files[0];
    let data;
    try { data = JSON.parse(await file.text()); } catch (e) { throw new Error(file.name + ": not valid JSON"); }
    const result = await ssa.api("POST", "/api/admin/sets", { set: data });
    ssa.message("Set " + result.name + ": " + result.added + " new items of " + result.items + ".");
  }));
  document.getElementById("new-chat").addEventListener("submit", (event) => guarded(event, async () => {
    await ssa.api("POST", "/api/admin/chats", {
      rater_id: document.getElementById("chat-rater").value.trim(),
      system: document.getElementById("chat-system").value,
      turns: parseInt(document.getElementById("chat-length").value, 10),
    });
  }));
  const role = await ssa.resume();
  if (role === "admin") {
    ssa.show("admin", true);
    try { await refresh(); } catch (e) { ssa.message(e.message); }
  } else {
    ssa.show("signin", true);
  }
});
