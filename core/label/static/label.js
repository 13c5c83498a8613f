"use strict";
// The labelling page. One item at a time: its responses start unranked; the labeller puts
// each in a tier (drag, or focus and press 1-9), may flag them, and submits. The server
// confirms a submission only once it is on disk; until then the page keeps the ranking,
// and a retry reuses the submission id, so a judgement is never lost nor saved twice.

const RESERVED = new Set(["j", "k", "s", "u", "t", "z", "?"]);
const NAME_KEY = "rlhfkit-label-name";
const $ = id => document.getElementById(id);

const state = {
  labeller: null,
  item: null,          // {id, prompt, responses: [{index, text}], flags: [...]}
  tier: new Map(),     // completion index -> tier (0 = best), absent = unranked
  flags: new Map(),    // completion index -> Set of flag names
  flagKeys: new Map(), // key -> flag name
  focus: 0,            // position (display order) of the focused response
  submission: null,    // id of the submission under way (reused on retry)
  shownAt: 0,
  busy: false,
};

// ------------------------------------------------------------------ the server
function newId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);  // works on plain http too, unlike randomUUID
  return Array.from(bytes, b => b.toString(16).padStart(2, "0")).join("");
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method, headers: body ? {"Content-Type": "application/json"} : {},
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (err) {
    throw new Error("could not reach the labelling server. Your ranking is still on this page: " +
                    "submit again when the server is back.");
  }
  let data = {};
  try { data = await response.json(); } catch (err) { /* reported below */ }
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function notice(text, kind) {
  const el = $("notice");
  el.textContent = text;
  el.className = kind || "";
}

// ------------------------------------------------------------------ loading items
async function loadNext() {
  const data = await api("GET", "/api/next?labeller=" + encodeURIComponent(state.labeller));
  show(data.item, data.progress);
}

function show(item, progress) {
  setProgress(progress);
  state.item = item;
  state.tier = new Map();
  state.flags = new Map();
  state.submission = newId();
  state.focus = 0;
  $("task").hidden = !item;
  $("finished").hidden = !!item;
  if (!item) return;
  state.shownAt = performance.now();
  if (item.previous) {  // an undone judgement: shown as it was submitted
    item.previous.tiers.forEach((tier, rank) => tier.forEach(i => state.tier.set(i, rank)));
    item.previous.flags.forEach((names, i) => { if (names.length) state.flags.set(i, new Set(names)); });
  }
  assignFlagKeys(item.flags);
  renderPrompt(item.prompt);
  render();
  focusCard(0);
}

function setProgress(p) {
  $("progress").max = p.total;
  $("progress").value = p.done;
  $("progress-text").textContent =
    `${p.done} / ${p.total} done` + (p.skipped ? ` (${p.skipped} skipped)` : "");
}

function assignFlagKeys(flags) {
  state.flagKeys = new Map();
  const keys = [];
  for (const flag of flags) {
    const key = [...flag].find(c => /[a-z]/.test(c) && !RESERVED.has(c) && !state.flagKeys.has(c));
    if (key) { state.flagKeys.set(key, flag); keys.push(`<kbd>${key}</kbd> ${flag}`); }
  }
  $("flag-keys").innerHTML = keys.join(" ");  // flag names are checked on the server: [a-z0-9-]
}

function renderPrompt(prompt) {
  const el = $("prompt");
  el.replaceChildren();
  if (typeof prompt === "string") { el.textContent = prompt; return; }
  for (const message of prompt) {
    const line = document.createElement("div");
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = message.role + ": ";
    line.append(role, document.createTextNode(message.content));
    el.append(line);
  }
}

// ------------------------------------------------------------------ the board
function letter(position) { return String.fromCharCode(65 + position); }

function render() {
  const board = $("board");
  board.replaceChildren();
  const k = state.item.responses.length;
  const rows = [];
  for (let t = 0; t < k; t++) rows.push(tierRow(t, t === 0 ? "1 · best" : t === k - 1 ? `${t + 1} · worst` : String(t + 1)));
  const pool = tierRow(null, "unranked");
  pool.classList.add("pool");
  state.item.responses.forEach((response, position) => {
    const t = state.tier.get(response.index);
    const row = t === undefined ? pool : rows[t];
    row.querySelector(".tier-cards").append(card(response, position));
  });
  board.append(...rows, pool);
  pool.hidden = state.tier.size === k;
  $("submit").disabled = state.tier.size !== k || state.busy;
}

function tierRow(t, label) {
  const row = document.createElement("div");
  row.className = "tier";
  row.dataset.tier = t === null ? "" : String(t);
  const head = document.createElement("div");
  head.className = "tier-label";
  head.textContent = label;
  const cards = document.createElement("div");
  cards.className = "tier-cards";
  row.append(head, cards);
  return row;
}

function card(response, position) {
  const el = document.createElement("div");
  el.className = "card";
  el.tabIndex = 0;
  el.dataset.index = String(response.index);
  el.dataset.position = String(position);
  el.dataset.letter = letter(position);
  const head = document.createElement("div");
  head.className = "card-head";
  const badge = document.createElement("span");
  badge.className = "letter";
  badge.textContent = letter(position);
  const flags = document.createElement("span");
  flags.className = "flags";
  const set = state.flags.get(response.index) || new Set();
  const keyOf = new Map([...state.flagKeys].map(([key, flag]) => [flag, key]));
  for (const flag of state.item.flags) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "flag";
    button.dataset.flag = flag;
    button.setAttribute("aria-pressed", set.has(flag) ? "true" : "false");
    button.title = keyOf.has(flag) ? `flag as ${flag} (key ${keyOf.get(flag)})` : `flag as ${flag}`;
    button.textContent = flag;
    button.addEventListener("click", () => { toggleFlag(response.index, flag); focusCard(position); });
    button.addEventListener("pointerdown", event => event.stopPropagation());
    flags.append(button);
  }
  head.append(badge, flags);
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = response.text;  // model output is text, never markup
  el.append(head, text);
  el.addEventListener("focus", () => { state.focus = position; });
  el.addEventListener("pointerdown", event => startDrag(event, el, response.index));
  return el;
}

function focusCard(position) {
  const n = state.item.responses.length;
  state.focus = (position + n) % n;
  const el = document.querySelector(`.card[data-position="${state.focus}"]`);
  if (el) el.focus();
}

function place(index, t) {
  if (t === null) state.tier.delete(index); else state.tier.set(index, t);
  render();
}

function toggleFlag(index, flag) {
  const set = state.flags.get(index) || new Set();
  if (set.has(flag)) set.delete(flag); else set.add(flag);
  state.flags.set(index, set);
  render();
}

// ------------------------------------------------------------------ dragging (pointer events)
function startDrag(event, el, index) {
  if (event.button !== 0 || state.busy) return;
  const start = {x: event.clientX, y: event.clientY};
  let ghost = null;
  let target = null;
  el.setPointerCapture(event.pointerId);
  const tierAt = (x, y) => {
    const under = document.elementFromPoint(x, y);
    return under ? under.closest(".tier") : null;
  };
  const move = e => {
    if (!ghost && Math.hypot(e.clientX - start.x, e.clientY - start.y) < 4) return;
    if (!ghost) {
      ghost = el.cloneNode(true);
      ghost.classList.add("ghost");
      ghost.style.width = Math.min(el.offsetWidth, 420) + "px";
      document.body.append(ghost);
      el.classList.add("dragging");
    }
    ghost.style.left = (e.clientX + 8) + "px";
    ghost.style.top = (e.clientY + 8) + "px";
    const over = tierAt(e.clientX, e.clientY);
    if (over !== target) {
      if (target) target.classList.remove("target");
      target = over;
      if (target) target.classList.add("target");
    }
  };
  const end = e => {
    el.removeEventListener("pointermove", move);
    el.removeEventListener("pointerup", end);
    el.removeEventListener("pointercancel", end);
    if (!ghost) { el.focus(); return; }  // a click: focus
    ghost.remove();
    el.classList.remove("dragging");
    if (target) target.classList.remove("target");
    const over = e.type === "pointerup" ? tierAt(e.clientX, e.clientY) : null;
    if (over) place(index, over.dataset.tier === "" ? null : Number(over.dataset.tier));
    else render();
    focusCard(Number(el.dataset.position));
  };
  el.addEventListener("pointermove", move);
  el.addEventListener("pointerup", end);
  el.addEventListener("pointercancel", end);
}

// ------------------------------------------------------------------ submitting
function tiersInOrder() {
  const used = [...new Set(state.tier.values())].sort((a, b) => a - b);
  return used.map(t => [...state.tier].filter(([, v]) => v === t).map(([i]) => i).sort((a, b) => a - b));
}

async function whileBusy(work) {
  if (state.busy) return;  // one request at a time: a double Enter sends one submission
  state.busy = true;
  setButtons();
  try {
    await work();
  } catch (err) {
    notice(err.message, "error");
  } finally {
    state.busy = false;
    setButtons();
  }
}

function send(path, body, done) {
  return whileBusy(async () => {
    const data = await api("POST", path, body);
    notice(done(data), "ok");
    await loadNext();
  });
}

function submit() {
  if (!state.item || state.tier.size !== state.item.responses.length) {
    notice("put every response in a tier first (drag it, or focus it and press 1-9)", "error");
    return;
  }
  const flags = {};
  for (const [i, set] of state.flags) if (set.size) flags[String(i)] = [...set];
  send("/api/submit", {
    labeller: state.labeller, item: state.item.id, tiers: tiersInOrder(), flags,
    submission: state.submission, seconds: Math.round((performance.now() - state.shownAt) / 100) / 10,
  }, data => `saved (${data.progress.done} / ${data.progress.total})`);
}

function skip() {
  if (!state.item) return;
  send("/api/skip", {labeller: state.labeller, item: state.item.id, submission: state.submission},
       () => "skipped");
}

function undo() {
  return whileBusy(async () => {
    const data = await api("POST", "/api/undo", {labeller: state.labeller});
    show(data.item, data.progress);
    notice("your last submission was taken back: change it and submit again", "ok");
  });
}

function tieAll() {
  if (!state.item) return;
  state.item.responses.forEach(r => state.tier.set(r.index, 0));
  render();
}

function setButtons() {
  for (const id of ["skip", "undo", "tie-all", "undo-finished"]) $(id).disabled = state.busy;
  $("submit").disabled = state.busy || !state.item || state.tier.size !== state.item.responses.length;
}

// ------------------------------------------------------------------ keys
document.addEventListener("keydown", event => {
  if (!state.labeller || event.target.tagName === "INPUT" || event.ctrlKey && event.key !== "z" || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key === "?" || key === "Escape") { $("help").hidden = key === "Escape" ? true : !$("help").hidden; return; }
  if (key === "u" || (event.ctrlKey && key === "z")) { event.preventDefault(); undo(); return; }
  if (!state.item) return;
  const focused = state.item.responses[state.focus];
  if (key === "ArrowDown" || key === "ArrowRight" || key === "j") { event.preventDefault(); focusCard(state.focus + 1); }
  else if (key === "ArrowUp" || key === "ArrowLeft" || key === "k") { event.preventDefault(); focusCard(state.focus - 1); }
  else if (/^[1-9]$/.test(key) && Number(key) <= state.item.responses.length) {
    place(focused.index, Number(key) - 1);
    const next = state.item.responses.findIndex(r => !state.tier.has(r.index));
    focusCard(next >= 0 ? next : state.focus);
  }
  else if (key === "0" || key === "Backspace" || key === "Delete") { event.preventDefault(); place(focused.index, null); focusCard(state.focus); }
  else if (state.flagKeys.has(key)) { toggleFlag(focused.index, state.flagKeys.get(key)); focusCard(state.focus); }
  else if (key === "t") { tieAll(); focusCard(state.focus); }
  else if (key === "Enter") { event.preventDefault(); submit(); }
  else if (key === "s") { skip(); }
});

// ------------------------------------------------------------------ starting
function start(name) {
  state.labeller = name;
  localStorage.setItem(NAME_KEY, name);
  $("login").hidden = true;
  $("labelling").hidden = false;
  $("who").hidden = false;
  $("labeller-name").textContent = name;
  loadNext().catch(err => notice(err.message, "error"));
}

function login() {
  state.labeller = null;
  $("labelling").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("name-input").focus();
}

window.addEventListener("DOMContentLoaded", () => {
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);
  $("undo-finished").addEventListener("click", undo);
  $("tie-all").addEventListener("click", tieAll);
  $("help-button").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });
  $("switch").addEventListener("click", () => { localStorage.removeItem(NAME_KEY); login(); });
  $("login-form").addEventListener("submit", event => {
    event.preventDefault();
    const name = $("name-input").value.trim();
    if (name) start(name);
  });
  const fromAddress = new URLSearchParams(location.search).get("labeller");
  const name = fromAddress || localStorage.getItem(NAME_KEY);
  if (name) start(name); else login();
  api("GET", "/api/session")
    .then(session => { $("session-name").textContent = `${session.name} · ${session.items} items`; })
    .catch(err => notice(err.message, "error"));
});
