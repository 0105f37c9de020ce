"use strict";
// The simulator's page: plain JS, no build step. It reads the simulator (/_sim/...) and the bot
// (/_sim/bot/... which the simulator forwards with the bot's tokens), and refreshes when the
// simulator says something changed (/_sim/events) and every few seconds for the bot's decisions,
// which a suppressed reply never shows to the simulator.

const $ = (id) => document.getElementById(id);
const state = {
  waId: localStorage.getItem("waId") || "", skew: 0, known: [], conversation: null, view: null,
  viewError: "", handoffs: null, agentView: null, templates: [],
};

// Short words for the reason codes the channel records (connector/window.py SuppressReason).
const REASONS = {
  template_limit: "one template per lapsed window",
  no_opt_in: "no opt-in",
  no_template: "no template mapped",
  template_unfillable: "template parameters missing",
  template_unavailable: "template not available at Meta",
  marketing_stopped: "customer stopped marketing",
  state_unknown: "window state unreadable",
};

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  try {
    const response = await fetch(path, options);
    let data = {};
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    return { ok: response.ok, status: response.status, data };
  } catch (error) {
    return { ok: false, status: 0, data: { error: String(error) } };
  }
}

const simNow = () => Date.now() / 1000 + state.skew;
const utc = (ts) => new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC";
const clockTime = (ts) => new Date(ts * 1000).toISOString().slice(11, 16);
function span(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s % 60} s`;
}
function notice(text) { $("notice").textContent = text || ""; }
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// --- reading -----------------------------------------------------------------------------------

async function refreshClock() {
  const { ok, data } = await api("GET", "/_sim/clock");
  if (ok) state.skew = data.now_float - Date.now() / 1000;
}

async function refreshSimulator() {
  const [list, conversation] = await Promise.all([
    api("GET", "/_sim/conversations"),
    state.waId ? api("GET", `/_sim/conversations/${state.waId}`) : null,
  ]);
  if (list.ok) {
    for (const c of list.data.conversations) if (!state.known.includes(c.wa_id)) state.known.push(c.wa_id);
  }
  if (!state.waId && state.known.length) select(state.known[0]);
  state.conversation = conversation && conversation.ok ? conversation.data : null;
}

async function refreshBot() {
  const [handoffs, view, agentView] = await Promise.all([
    api("GET", "/_sim/bot/agent/conversations"),
    state.waId ? api("GET", `/_sim/bot/conversations/${state.waId}`) : null,
    state.waId ? api("GET", `/_sim/bot/agent/conversations/${state.waId}`) : null,
  ]);
  state.handoffs = handoffs.ok ? handoffs.data.conversations : null;
  state.view = view && view.ok ? view.data : null;
  state.viewError = view && !view.ok ? (view.data.error || `the bot answered ${view.status}`) : "";
  state.agentView = agentView && agentView.ok ? agentView.data : null;
}

async function refresh() {
  await Promise.all([refreshClock(), refreshSimulator(), refreshBot()]);
  render();
}

let queued = null;
function soon() { clearTimeout(queued); queued = setTimeout(refresh, 60); }

// --- the phone ---------------------------------------------------------------------------------

async function say(spec) {
  if (!state.waId) select(newWaId());
  const { ok, data } = await api("POST", `/_sim/customers/${state.waId}/messages`, spec);
  notice(ok ? "" : `not delivered: ${data.error || "the simulator refused it"}`);
  soon();
}

function tapButton(wamid, reply) { say({ button_reply: reply, context: { id: wamid } }); }
function tapRow(wamid, row) { say({ list_reply: { id: row.id, title: row.title }, context: { id: wamid } }); }

function choices(buttons) { return el("div", { class: "choices" }, ...buttons); }

function bubbleContent(message) {
  const p = message.payload || {};
  const kind = message.type;
  if (kind === "text") return [p.text ? p.text.body : message.text];
  if (kind === "template") {
    const template = p.template || {};
    const quickReplies = (template.components || []).filter((c) => c.type === "button" && c.sub_type === "quick_reply");
    const registered = state.templates.find((t) => t.name === template.name) || { buttons: [] };
    const buttons = quickReplies.map((c) => {
      const title = (registered.buttons[Number(c.index)] || {}).text || "Reply";
      const payload = ((c.parameters || [])[0] || {}).payload || title;
      return el("button", { type: "button", onclick: () => say({ button: { text: title, payload } }) }, title);
    });
    return [el("span", { class: "label" }, `template ${template.name}`), message.text, buttons.length ? choices(buttons) : null];
  }
  if (kind === "interactive" && message.direction === "in") {  // the customer tapped a button or a row
    const reply = (p.interactive || {})[(p.interactive || {}).type] || {};
    return [reply.title || message.text, el("span", { class: "label" }, `tapped ${reply.id || ""}`)];
  }
  if (kind === "button" && message.direction === "in") return [(p.button || {}).text || message.text];
  if (kind === "interactive") {
    const i = p.interactive || {};
    const parts = [];
    if (i.header && i.header.text) parts.push(el("strong", {}, i.header.text), "\n");
    if (i.body) parts.push(i.body.text);
    if (i.type === "button") {
      parts.push(choices((i.action.buttons || []).map((b) => el("button",
        { type: "button", "data-id": b.reply.id, onclick: () => tapButton(message.wamid, b.reply) }, b.reply.title))));
    } else if (i.type === "list") {
      const rows = (i.action.sections || []).flatMap((s) => s.rows || []);
      parts.push(el("details", {}, el("summary", {}, i.action.button || "Options"), choices(rows.map((r) => el("button",
        { type: "button", "data-id": r.id, onclick: () => tapRow(message.wamid, r) }, r.title + (r.description ? ` (${r.description})` : ""))))));
    } else if (i.type === "cta_url") {
      const params = i.action.parameters || {};
      parts.push(choices([el("a", { href: params.url, target: "_blank", rel: "noopener" }, params.display_text || params.url)]));
    }
    if (i.footer) parts.push(el("span", { class: "label" }, i.footer.text));
    return parts;
  }
  if (kind === "image" || kind === "sticker") {
    const media = p[kind] || {};
    const label = el("span", { class: "media" }, `🖼 ${media.caption || media.link || "photo"}`);
    if (!media.link) return [label];
    const img = el("img", { src: media.link, alt: media.caption || "photo" });
    img.addEventListener("error", () => img.replaceWith(label));
    return [img, media.caption ? "\n" + media.caption : null];
  }
  if (["document", "video", "audio"].includes(kind)) {
    const media = p[kind] || {};
    const name = media.filename || media.caption || media.link || kind;
    return [el("span", { class: "media" }, media.link ? el("a", { href: media.link, target: "_blank", rel: "noopener" }, `📄 ${name}`) : `📄 ${name}`),
      media.caption && media.caption !== name ? "\n" + media.caption : null];
  }
  if (kind === "location") {
    const l = p.location || {};
    return [`📍 ${[l.name, l.address].filter(Boolean).join(", ") || "Location"} (${l.latitude}, ${l.longitude})`];
  }
  if (kind === "contacts") {
    return (p.contacts || []).map((c) => `👤 ${(c.name || {}).formatted_name || "contact"} ${((c.phones || [])[0] || {}).phone || ""}`);
  }
  return [message.text || `(${kind})`];
}

function renderChat() {
  const chat = $("chat");
  const conversation = state.conversation;
  $("phone-name").textContent = state.waId ? (conversation && conversation.name) || "Customer" : "No customer yet";
  $("phone-number").textContent = state.waId ? `+${state.waId}` : "";
  const atBottom = chat.scrollTop + chat.clientHeight >= chat.scrollHeight - 30;
  chat.replaceChildren();
  if (!conversation) {
    chat.append(el("li", { class: "bot" }, state.waId ? "Say hi to the bot below." : "Pick or add a customer above."));
    return;
  }
  for (const message of conversation.messages) {
    const outbound = message.direction === "out";
    const ticks = outbound ? "" : message.read_at ? "✓✓" : "✓";
    const meta = el("span", { class: "meta" }, clockTime(message.timestamp), " ",
      outbound ? (message.status || "") : el("span", { class: `ticks ${message.read_at ? "read" : ""}`, "aria-label": message.read_at ? "read" : "delivered" }, ticks));
    const item = el("li", { class: outbound ? "bot" : "customer", "data-type": message.type, "data-wamid": message.wamid },
      ...bubbleContent(message), meta);
    if (message.status === "failed") item.append(el("span", { class: "failed" }, `not delivered: ${(message.errors[0] || {}).code || ""} ${(message.errors[0] || {}).title || ""}`));
    chat.append(item);
  }
  if (atBottom) chat.scrollTop = chat.scrollHeight;
}

// --- the care window ---------------------------------------------------------------------------

function reasonWords(record) {
  if (record.reason_code && REASONS[record.reason_code]) return REASONS[record.reason_code];
  return record.reason || "no reason recorded";
}

function decisionText(record) {
  if (record.kind === "free_form") return ["free-form", record.response || "free text (from an action or an agent)"];
  if (record.kind === "template") return [`template ${record.template}`, record.reason ? `stands in: ${record.reason}` : record.response];
  if (record.kind === "suppressed") {
    const words = reasonWords(record);
    return [`suppressed: ${words}`, words === record.reason ? null : record.reason];
  }
  return [`failed ${record.code || ""}`.trim() + (record.reason ? `: ${record.reason}` : ""), record.template || record.response];
}

function windowText(view) {
  if (view.unknown) return [`unknown: ${view.unknown}`, "closed"];
  if (view.window_open && view.expires_at) return [`open, closes in ${span(view.expires_at - simNow())}`, "open"];
  if (view.last_inbound_at) {
    const closedAt = view.last_inbound_at + 86400 - (view.margin_seconds || 0);
    return [`closed since ${utc(closedAt)} (${span(simNow() - closedAt)} ago)`, "closed"];
  }
  return ["never opened: the customer has not written", "closed"];
}

function renderWindow() {
  const view = state.view;
  if (!view) {
    const why = state.viewError || (state.waId ? "loading…" : "no customer");
    for (const id of ["window-state", "opt-in", "templates-left", "marketing"]) $(id).textContent = "–";
    $("window-state").textContent = why;
    $("timeline").replaceChildren();
    return;
  }
  const [text, cls] = windowText(view);
  $("window-state").textContent = text;
  $("window-state").className = cls;
  $("opt-in").textContent = view.opt_in === true ? "yes" : view.opt_in === false ? "no" : "not asked";
  $("templates-left").textContent = String(view.templates_left);
  $("marketing").textContent = view.marketing_stopped ? "stopped by the customer" : "allowed";
  $("timeline").replaceChildren(...[...view.records].reverse().map((record) => {
    const [head, detail] = decisionText(record);
    return el("li", { class: record.kind },
      el("span", { class: "kind" }, head),
      detail ? el("span", { class: "detail" }, detail) : null,
      el("time", {}, `${utc(record.at)}${record.status && record.kind !== "suppressed" ? ` · ${record.status}` : ""}`));
  }));
  if (!view.records.length) $("timeline").append(el("li", {}, "Nothing sent to this customer yet."));
}

// --- the agent desk ----------------------------------------------------------------------------

function renderAgent() {
  const list = $("handoffs");
  if (state.handoffs === null) {
    list.replaceChildren(el("li", {}, "The agent API is not reachable (is the bot up, with WHATSAPP_AGENT_TOKEN?)"));
  } else if (!state.handoffs.length) {
    list.replaceChildren(el("li", {}, "No conversation is with an agent."));
  } else {
    list.replaceChildren(...state.handoffs.map((c) => el("li", {},
      el("button", { type: "button", onclick: () => { select(c.sender_id); refresh(); } }, `+${c.sender_id}`),
      ` since ${utc(c.since)}${c.reason ? `: ${c.reason}` : ""}`)));
  }
  const view = state.agentView;
  $("handoff").hidden = !view || view.paused;
  $("agent").hidden = !view || !view.paused;
  if (!view || !view.paused) return;
  $("agent-status").textContent = `+${view.sender_id} is with an agent` + (view.handoff && view.handoff.reason ? `: ${view.handoff.reason}` : "");
  const locked = !view.window_open;
  $("agent-text").disabled = locked;
  $("agent-send").disabled = locked;
  const lock = $("agent-lock");
  const lines = [];
  if (locked) {
    lines.push(`Locked: the care window closed ${view.expired_at ? `at ${utc(view.expired_at)}` : "(the customer never wrote)"}; `
      + `outside it only a template can reach the customer (${view.templates_left} left, opt-in ${view.opt_in ? "yes" : "no"}).`);
  }
  if (lock.dataset.refusal) lines.push(lock.dataset.refusal);
  lock.hidden = !lines.length;
  lock.textContent = lines.join("\n");
  const picker = $("template-name");
  const names = view.templates || [];
  if (picker.dataset.names !== names.join(",")) {
    picker.dataset.names = names.join(",");
    picker.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    renderParams();
  }
}

function chosenTemplate() {
  return state.templates.find((t) => t.name === $("template-name").value && t.status === "APPROVED")
    || state.templates.find((t) => t.name === $("template-name").value);
}

function renderParams() {
  const template = chosenTemplate();
  const box = $("template-params");
  box.replaceChildren();
  if (!template) return;
  box.append(el("p", { class: "detail" }, template.body || ""));
  for (let i = 1; i <= template.body_params; i += 1) {
    const id = `param-${i}`;
    box.append(el("label", { for: id }, `Body parameter {{${i}}}`), el("input", { id, "data-param": String(i), required: "" }));
  }
}

async function agentSend(body) {
  const { ok, status, data } = await api("POST", `/_sim/bot/agent/conversations/${state.waId}/messages`, body);
  const lock = $("agent-lock");
  if (ok) {
    delete lock.dataset.refusal;
    notice(`agent message sent: ${data.decision || "ok"}`);
  } else {
    lock.dataset.refusal = `Refused (${status}${data.error ? ` ${data.error}` : ""}): ${data.reason || data.message || ""}`;
  }
  await refresh();
  return ok;
}

// --- wiring ------------------------------------------------------------------------------------

function newWaId() {
  let waId;
  do { waId = "4915" + String(Math.floor(Math.random() * 1e8)).padStart(8, "0"); } while (state.known.includes(waId));
  return waId;
}

function select(waId) {
  state.waId = waId;
  localStorage.setItem("waId", waId);
  if (waId && !state.known.includes(waId)) state.known.push(waId);
  state.conversation = state.view = state.agentView = null;
  delete $("agent-lock").dataset.refusal;
}

function render() {
  const picker = $("customer");
  picker.replaceChildren(...state.known.map((w) => el("option", { value: w }, `+${w}`)));
  picker.value = state.waId;
  $("sim-now").textContent = utc(simNow());
  renderChat();
  renderWindow();
  renderAgent();
}

async function moveClock(body) {
  const { ok, data } = await api("POST", "/_sim/clock", body);
  notice(ok ? `clock ${data.offset ? `moved ${span(data.offset)} ahead of real time` : "back to now"}` : data.error);
  await refresh();
}

function wire() {
  $("customer").addEventListener("change", (e) => { select(e.target.value); refresh(); });
  $("new-customer").addEventListener("click", () => { select(newWaId()); render(); $("message").focus(); });
  document.querySelectorAll("[data-advance]").forEach((b) => b.addEventListener("click", () => moveClock({ advance: Number(b.dataset.advance) })));
  $("custom-advance").addEventListener("click", () => {
    const hours = Number($("custom-hours").value);
    if (hours) moveClock({ advance: hours * 3600 });
  });
  $("clock-reset").addEventListener("click", () => moveClock({ reset: true }));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("message").value.trim();
    if (!text) return;
    $("message").value = "";
    say({ text });
  });
  const attachments = {
    image: () => ({ image: { caption: $("message").value.trim() || undefined } }),
    document: () => ({ document: { filename: "receipt.pdf", caption: $("message").value.trim() || undefined } }),
    location: () => ({ location: { latitude: 52.5219, longitude: 13.4132, name: "Alexanderplatz", address: "Berlin" } }),
    contacts: () => ({ contacts: [{ name: { formatted_name: "Ada Lovelace", first_name: "Ada" }, phones: [{ phone: "+44 20 7946 0000", type: "CELL" }] }] }),
  };
  document.querySelectorAll("[data-attach]").forEach((b) => b.addEventListener("click", () => {
    b.closest("details").open = false;
    say(attachments[b.dataset.attach]());
    $("message").value = "";
  }));
  $("agent-composer").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("agent-text").value.trim();
    if (text && await agentSend({ text })) $("agent-text").value = "";
  });
  $("template-name").addEventListener("change", renderParams);
  $("template-picker").addEventListener("submit", (e) => {
    e.preventDefault();
    const template = chosenTemplate();
    if (!template) return;
    const body = [...document.querySelectorAll("[data-param]")].map((input) => input.value);
    agentSend({ template: { name: template.name, language: template.language, body } });
  });
  $("resume").addEventListener("click", async () => {
    await api("POST", `/_sim/bot/agent/conversations/${state.waId}/resume`, {});
    refresh();
  });
  $("handoff").addEventListener("click", async () => {
    await api("POST", `/_sim/bot/agent/conversations/${state.waId}/handoff`, { reason: "taken over from the simulator page" });
    refresh();
  });
}

async function start() {
  wire();
  const templates = await api("GET", "/_sim/templates");
  if (templates.ok) state.templates = templates.data.templates;
  await refresh();
  new EventSource("/_sim/events").onmessage = soon;
  setInterval(() => { $("sim-now").textContent = utc(simNow()); if (state.view) renderWindow(); }, 1000);
  setInterval(async () => { await refreshBot(); render(); }, 2500);
}

start();
