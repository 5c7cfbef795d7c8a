// The lifecycle dashboard's script: local times, live updates while the tab is visible, confirmed
// actions with the token in a header. The pages read without it; nothing here builds HTML from data
// (fresh parts come from the server, escaped there, and are swapped in whole).
"use strict";
(() => {
  const body = document.body;
  const base = body.dataset.base || "";
  const mode = body.dataset.mode;
  const tokenKey = "lifecycle-dashboard-token " + location.host + base;
  const interval = 1000; // ms between refreshes while the tab is visible
  document.documentElement.classList.add("js");

  // -- times in the viewer's time zone (the title keeps UTC) ---------------------------------------------
  const format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
    hour12: false, timeZoneName: "short",
  });
  function localize(root) {
    for (const element of root.querySelectorAll("time[datetime]")) {
      const moment = new Date(element.getAttribute("datetime"));
      if (!Number.isNaN(moment.getTime())) element.textContent = format.format(moment);
    }
  }

  // -- messages -------------------------------------------------------------------------------------------
  function flash(message, ok) {
    const box = document.getElementById("flash");
    box.textContent = message;
    box.className = ok ? "ok" : "error";
  }
  function status(text) {
    const box = document.getElementById("live-status");
    if (box) box.textContent = text;
  }

  // -- live updates -----------------------------------------------------------------------------------------
  let timer = null;
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(location.href, {
        headers: { "X-Lifecycle-Live": "1" }, cache: "no-store", credentials: "same-origin",
      });
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const part of document.querySelectorAll("[data-live]")) {
        const replacement = fresh.getElementById(part.id);
        if (replacement && replacement.hasAttribute("data-live")) {
          part.replaceWith(document.adoptNode(replacement));
        }
      }
      localize(document);
      if (document.hidden) {
        status("paused while the tab is hidden");
      } else if (response.ok || response.status === 404) {
        status("live · updated " + format.format(new Date()));
      } else {
        status("live · the store did not answer (HTTP " + response.status + ")");
      }
    } catch (error) {
      status("offline: the dashboard cannot be reached");
    } finally {
      busy = false;
    }
  }
  function start() {
    if (timer === null) timer = setInterval(refresh, interval);
  }
  function stop() {
    if (timer !== null) {
      clearInterval(timer);
      timer = null;
    }
  }
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      stop();
      status("paused while the tab is hidden");
    } else {
      refresh();
      start();
    }
  });

  // -- actions ----------------------------------------------------------------------------------------------
  function confirmed(text) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }
  function post(path, request, token) {
    const headers = { "Content-Type": "application/json", "X-Lifecycle-Dashboard": "1" };
    if (token) headers["X-Lifecycle-Token"] = token;
    return fetch(base + path, {
      method: "POST", headers, body: JSON.stringify(request), credentials: "same-origin", cache: "no-store",
    }).then((response) => response.json());
  }
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    event.preventDefault();
    if (!(await confirmed(button.dataset.confirm))) return;
    const request = { action: button.dataset.action };
    for (const key of ["task", "queue", "state"]) {
      if (button.dataset[key] !== undefined) request[key] = button.dataset[key];
    }
    let result;
    try {
      result = await post("/api/action", request, sessionStorage.getItem(tokenKey));
    } catch (error) {
      result = { ok: false, message: "the dashboard cannot be reached" };
    }
    flash(result.message, result.ok);
    await refresh();
  });

  // -- the token (kept for this tab only, sent in a header, never in a URL) --------------------------------
  const tokenForm = document.getElementById("token-form");
  function showToken() {
    const unlocked = sessionStorage.getItem(tokenKey) !== null;
    document.getElementById("token-input").hidden = unlocked;
    document.getElementById("token-unlock").hidden = unlocked;
    document.getElementById("token-lock").hidden = !unlocked;
    tokenForm.classList.toggle("unlocked", unlocked);
  }
  if (tokenForm && mode === "token") {
    tokenForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const input = document.getElementById("token-input");
      const token = input.value.trim();
      if (!token) return;
      let result;
      try {
        result = await post("/api/token", {}, token);
      } catch (error) {
        result = { ok: false, message: "the dashboard cannot be reached" };
      }
      if (result.ok) sessionStorage.setItem(tokenKey, token);
      input.value = "";
      flash(result.message, result.ok);
      showToken();
    });
    document.getElementById("token-lock").addEventListener("click", () => {
      sessionStorage.removeItem(tokenKey);
      flash("actions locked: the token is forgotten", true);
      showToken();
    });
    showToken();
  }

  localize(document);
  if (!document.hidden) {
    status("live · updated " + format.format(new Date()));
    start();
  }
})();
