// The live view's page: draws what web_view.py pushes over /events (one JSON message per node
// event, plus the picture of the whole cluster when the page connects) and sends the buttons'
// requests to /api/<action>. No build step: plain browser JavaScript.
"use strict";

const LOG_CELLS = 48;          // the last entries shown in each node's log row
const NARRATION_KEPT = 300;
const SVG_NS = "http://www.w3.org/2000/svg";

const view = {
  nodes: new Map(),            // node id (or address until known) -> node
  processes: {},               // node id -> "running" | "paused" | "exited" | "removed" (+ " isolated")
  actions: [],
  canCut: [],
  clockOffset: 0,              // server time minus page time, seconds
  timeScale: 1,
  dirty: true,
};

const $ = (id) => document.getElementById(id);
const now = () => Date.now() / 1000 + view.clockOffset;

function termColour(term) {
  if (!term) return "#c4c9d2";
  return `hsl(${(term * 137.508) % 360}, 62%, 48%)`;
}

function keyOf(node) { return node.node_id != null ? String(node.node_id) : node.address; }

function takeNode(picture) {
  // Drop an entry known only by address once its id is learnt.
  if (picture.node_id != null) view.nodes.delete(picture.address);
  const key = keyOf(picture);
  const old = view.nodes.get(key) || {};
  view.nodes.set(key, Object.assign(old, picture));
  return view.nodes.get(key);
}

function stateOf(node) {
  const proc = view.processes[node.node_id];
  if (proc && proc.startsWith("removed")) return ["removed", "removed from the cluster"];
  if (proc && proc.startsWith("exited")) return ["down", "down: its process exited"];
  if (proc && proc.startsWith("paused")) return ["paused", "paused (SIGSTOP): answers nothing"];
  if (!node.reachable) return ["unreachable", "unreachable: " + (node.problem || "no answer")];
  if (node.last && node.last.members.length && !node.last.members.includes(node.node_id)) {
    return ["removed", "no longer a member"];
  }
  return ["up", proc && proc.includes("isolated") ? "cut off from the others" : ""];
}

function roleOf(node) {
  const ev = node.last;
  if (!ev) return "unknown";
  return ev.role || "unknown";
}

// -- messages between nodes ------------------------------------------------------------------

// Which messages an event shows, as [{from, to, cls, label}]. Each exchange is drawn once, from
// the side that reports sending it: the leader's "send" of a batch or snapshot chunk, a voter's
// "answer", a candidate's "ask" (to every other member), a client's request to the node it reached.
function messagesOf(ev) {
  const me = ev.node_id, peer = ev.peer, action = ev.action || "";
  const prevote = ev.kind === "pre_vote";
  switch (ev.kind) {
    case "replicate":
      if (!peer || (action ? action !== "send" : ev.role !== "leader")) return [];
      return [{ from: me, to: peer, cls: ev.ok ? "m-append" : "m-refused", label: ev.count ? String(ev.count) : "", heartbeat: !ev.count }];
    case "vote":
    case "pre_vote":
      if (action === "ask") {
        return (ev.members || []).filter((m) => m !== me)
          .map((m) => ({ from: me, to: m, cls: prevote ? "m-prevote" : "m-vote", label: "?" }));
      }
      if (!peer || (action && action !== "answer")) return [];
      return [{ from: me, to: peer, cls: !ev.ok ? "m-refused" : prevote ? "m-prevote" : "m-vote", label: ev.ok ? "✓" : "✗" }];
    case "snapshot":
      if (!peer || (action ? action !== "send" : ev.role !== "leader")) return [];
      return [{ from: me, to: peer, cls: "m-snapshot", label: "" }];
    case "transfer":
      if (!peer || (action && action !== "timeout_now")) return [];
      return [{ from: me, to: peer, cls: "m-transfer", label: "" }];
    case "client":
      return [{ from: "client", to: me, cls: ev.ok ? "m-client" : "m-refused", label: action === "redirect" ? "↪" : "" }];
    default:
      return [];
  }
}

function drawMessage(msg) {
  const a = positions.get(String(msg.from)), b = positions.get(String(msg.to));
  if (!a || !b) return;
  const colours = { "m-append": "#3a78c2", "m-vote": "#2f9e44", "m-refused": "#d6336c", "m-prevote": "#94d82d",
    "m-snapshot": "#7048e8", "m-transfer": "#f08c00", "m-client": "#111" };
  const g = document.createElementNS(SVG_NS, "g");
  const dot = document.createElementNS(SVG_NS, "circle");
  dot.setAttribute("r", msg.cls === "m-snapshot" ? 8 : msg.heartbeat ? 3.5 : 5.5);
  if (msg.heartbeat) dot.setAttribute("opacity", "0.55");
  dot.setAttribute("fill", colours[msg.cls]);
  g.appendChild(dot);
  if (msg.label) {
    const text = document.createElementNS(SVG_NS, "text");
    text.setAttribute("dy", -8);
    text.setAttribute("text-anchor", "middle");
    text.textContent = msg.label;
    g.appendChild(text);
  }
  $("messages").appendChild(g);
  const duration = 450 * Math.min(4, Math.max(1, Math.sqrt(view.timeScale)));
  const start = performance.now();
  function step(t) {
    const f = Math.min(1, (t - start) / duration);
    // Stop short of the circles so the dot is seen arriving.
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1, r = 26 / len;
    const p = r + (1 - 2 * r) * f;
    g.setAttribute("transform", `translate(${a.x + dx * p},${a.y + dy * p})`);
    if (f < 1) requestAnimationFrame(step); else g.remove();
  }
  requestAnimationFrame(step);
}

// -- drawing ---------------------------------------------------------------------------------

const positions = new Map();   // node id -> {x, y}; "client" -> the client's box

function sortedNodes() {
  return [...view.nodes.values()].sort((a, b) => (a.node_id ?? 1e18) - (b.node_id ?? 1e18));
}

function drawRing() {
  const svg = $("ring");
  const nodes = sortedNodes().filter((n) => n.node_id != null);
  const cx = 210, cy = 175, radius = 125;
  positions.clear();
  positions.set("client", { x: 210, y: 175 });
  nodes.forEach((n, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, nodes.length);
    positions.set(String(n.node_id), { x: cx + radius * Math.cos(angle), y: cy + radius * Math.sin(angle) });
  });
  let ring = $("ring-nodes");
  if (!ring) {
    svg.innerHTML = `<g id="links"></g><g id="ring-nodes"></g><g id="messages"></g>`;
    ring = $("ring-nodes");
  }
  const links = $("links");
  links.innerHTML = "";
  const cut = (id) => (view.processes[id] || "").includes("isolated");
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const a = positions.get(String(nodes[i].node_id)), b = positions.get(String(nodes[j].node_id));
      const line = document.createElementNS(SVG_NS, "line");
      line.setAttribute("x1", a.x); line.setAttribute("y1", a.y);
      line.setAttribute("x2", b.x); line.setAttribute("y2", b.y);
      const broken = cut(nodes[i].node_id) || cut(nodes[j].node_id);
      line.setAttribute("stroke", broken ? "#e8a0a0" : "#e3e6ec");
      if (broken) line.setAttribute("stroke-dasharray", "4 4");
      links.appendChild(line);
    }
  }
  const box = document.createElementNS(SVG_NS, "text");
  box.setAttribute("x", 210); box.setAttribute("y", 179); box.setAttribute("text-anchor", "middle");
  box.setAttribute("class", "node-label"); box.textContent = "clients";
  links.appendChild(box);
  ring.innerHTML = "";
  const t = now();
  for (const n of nodes) {
    const p = positions.get(String(n.node_id));
    const [state] = stateOf(n);
    const role = roleOf(n);
    const fill = state !== "up" ? "var(--down)" : `var(--${["leader", "candidate", "learner"].includes(role) ? role : "follower"})`;
    const g = document.createElementNS(SVG_NS, "g");
    g.setAttribute("transform", `translate(${p.x},${p.y})`);
    let html = `<circle r="24" fill="${fill}" ${state === "unreachable" ? 'stroke="#b03a3a" stroke-dasharray="3 3" stroke-width="2"' : ""}></circle>`;
    // The election timer: a ring that drains until it fires.
    const f = timerFraction(n, t);
    if (f != null && state === "up") {
      const c = 2 * Math.PI * 29;
      html += `<circle r="29" fill="none" stroke="#e3e6ec" stroke-width="4"></circle>` +
        `<circle r="29" fill="none" stroke="var(--candidate)" stroke-width="4" transform="rotate(-90)" ` +
        `stroke-dasharray="${(c * f).toFixed(1)} ${c.toFixed(1)}"></circle>`;
    }
    html += `<text class="node-id" text-anchor="middle" dy="0">${n.node_id}</text>`;
    html += `<text class="node-sub" text-anchor="middle" dy="14">t${n.last ? n.last.term : "?"}</text>`;
    const under = state !== "up" ? state : role;
    html += `<text class="node-label" text-anchor="middle" dy="46">${under}</text>`;
    g.innerHTML = html;
    ring.appendChild(g);
  }
}

function timerFraction(n, t) {
  if (!n.timer_deadline || roleOf(n) === "leader") return null;
  const total = n.timer_deadline - n.timer_start;
  if (!(total > 0)) return null;
  return Math.max(0, Math.min(1, (n.timer_deadline - t) / total));
}

function ago(seconds) {
  if (seconds == null) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms ago`;
  if (seconds < 120) return `${seconds.toFixed(1)} s ago`;
  return `${Math.round(seconds / 60)} min ago`;
}

function button(action, label, node, harness, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.node = node;
  if (harness) b.className = "h";
  if (title) b.title = title;
  return b;
}

function nodeCard(n) {
  let card = document.querySelector(`.node[data-key="${CSS.escape(keyOf(n))}"]`);
  if (!card) {
    card = document.createElement("div");
    card.className = "node";
    card.dataset.key = keyOf(n);
    card.innerHTML = `<div class="head"><span class="name"></span><span class="badge"></span>` +
      `<span class="state"></span><span class="stat term"></span><span class="stat vote"></span>` +
      `<span class="stat leader"></span><span class="stat timer-wrap">timer <span class="timer"><i></i></span></span>` +
      `<span class="stat contact"></span></div><div class="row"><div class="log"></div><span class="acts"></span></div>` +
      `<div class="marks"></div>`;
    const acts = card.querySelector(".acts");
    if (n.node_id != null) {
      acts.append(
        button("transfer", "lead", n.node_id, false, "hand leadership to this node"),
        button("kill", "kill -9", n.node_id, true), button("restart", "restart", n.node_id, true),
        button("pause", "pause", n.node_id, true), button("resume", "resume", n.node_id, true),
        button("cut", "cut off", n.node_id, true, "drop every message between this node and the others"),
        button("heal", "heal", n.node_id, true), button("remove", "remove", n.node_id, true, "remove this member for good"));
    }
    $("nodes").appendChild(card);
  }
  return card;
}

function render() {
  view.dirty = false;
  const nodes = sortedNodes();
  // Cards in id order; an address-only card is replaced once its id is known.
  const keys = new Set(nodes.map(keyOf));
  for (const card of document.querySelectorAll(".node")) if (!keys.has(card.dataset.key)) card.remove();
  const lastAll = Math.max(0, ...nodes.map((n) => (n.last ? n.last.last_index : 0)));
  const first = Math.max(1, lastAll - LOG_CELLS + 1);
  const t = now();
  for (const n of nodes) {
    const card = nodeCard(n);
    const ev = n.last;
    const [state, why] = stateOf(n);
    const role = roleOf(n);
    card.dataset.nodeId = n.node_id ?? "";
    card.dataset.role = role;
    card.dataset.state = state;
    card.dataset.term = ev ? ev.term : "";
    card.dataset.lastIndex = ev ? ev.last_index : "";
    card.dataset.commit = ev ? ev.commit_index : "";
    card.dataset.applied = ev ? ev.applied_index : "";
    card.querySelector(".name").textContent = n.node_id != null ? `node ${n.node_id}` : n.address;
    card.querySelector(".name").title = n.address;
    // A node that is not up shows that, not the role it last reported (kept in data-role).
    card.querySelector(".badge").textContent = state === "up" ? role : state;
    card.querySelector(".state").textContent = why;
    card.querySelector(".term").innerHTML = `term <b>${ev ? ev.term : "?"}</b>`;
    card.querySelector(".vote").innerHTML = `voted for <b>${ev && ev.voted_for != null ? ev.voted_for : "—"}</b>`;
    card.querySelector(".leader").innerHTML = `leader <b>${ev && ev.leader_id != null ? ev.leader_id : "—"}</b>`;
    const f = timerFraction(n, t);
    card.querySelector(".timer-wrap").style.visibility = f != null && state === "up" ? "visible" : "hidden";
    card.querySelector(".timer i").style.width = f != null ? `${(f * 100).toFixed(1)}%` : "0";
    const contact = state !== "up" ? "" : role === "leader" ? "leads" : `heard from leader <b>${ago(n.leader_contact ? Math.max(0, t - n.leader_contact) : null)}</b>`;
    card.querySelector(".contact").innerHTML = contact;
    for (const b of card.querySelectorAll(".acts button")) {
      const a = b.dataset.action;
      const usable = a === "transfer" || view.actions.includes(a);
      b.hidden = !usable || ((a === "cut" || a === "heal") && !view.canCut.includes(n.node_id));
    }
    drawLog(card.querySelector(".log"), n, first, lastAll);
    card.querySelector(".marks").textContent = ev
      ? `last index ${ev.last_index} (term ${ev.last_term}) · commit ${ev.commit_index} · applied ${ev.applied_index}` +
        (ev.snapshot_index ? ` · snapshot up to ${ev.snapshot_index}` : "") + ` · ${n.address}`
      : n.address;
  }
  drawRing();
}

function drawLog(row, n, first, lastAll) {
  const ev = n.last;
  const parts = [];
  if (first > 1) parts.push(`<span class="gap">…${first - 1}</span>`);
  for (let i = first; i <= lastAll; i++) {
    if (!ev || i > ev.last_index) { parts.push(`<span class="cell empty" data-index="${i}"></span>`); continue; }
    const classes = ["cell"];
    let style = "", term = n.terms ? n.terms[i] : undefined, label = "";
    if (i <= ev.snapshot_index) classes.push("snap");
    else if (term === undefined) { classes.push("unknown"); label = "?"; }
    else { style = `background:${termColour(term)}`; label = term; }
    if (i <= ev.commit_index) classes.push("committed");
    if (i <= ev.applied_index) classes.push("applied");
    if (i === ev.commit_index) classes.push("commit-mark");
    const title = `index ${i}` + (term !== undefined ? `, term ${term}` : "") +
      (i <= ev.snapshot_index ? ", in the snapshot" : "") + (i <= ev.commit_index ? ", committed" : ", not committed") +
      (i <= ev.applied_index ? ", applied" : "");
    parts.push(`<span class="${classes.join(" ")}" style="${style}" data-index="${i}" data-term="${term ?? ""}" title="${title}">${String(label).slice(-2)}</span>`);
  }
  row.innerHTML = parts.join("");
}

// -- narration and requests ------------------------------------------------------------------

function clock(t) {
  const d = new Date(t * 1000);
  return d.toTimeString().slice(0, 8) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function addNarration(line) {
  const list = $("narration");
  const li = document.createElement("li");
  li.innerHTML = `<span class="when"></span> <span class="who"></span> <span class="what"></span>`;
  li.querySelector(".when").textContent = clock(line.time);
  li.querySelector(".who").textContent = `[${line.node_id}]`;
  li.querySelector(".who").style.color = "#3a78c2";
  li.querySelector(".what").textContent = line.text;
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.appendChild(li);
  while (list.children.length > NARRATION_KEPT) list.firstChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function addRequest(r) {
  const li = document.createElement("li");
  li.className = r.ok ? "ok" : "fail";
  li.textContent = `${clock(r.time)} ${r.ok ? "✔" : "✘"} ${r.text} (${(r.took * 1000).toFixed(0)} ms)`;
  const list = $("requests");
  list.prepend(li);
  while (list.children.length > 50) list.lastChild.remove();
}

function setScale(scale) {
  if (!scale) return;
  view.timeScale = scale;
  const el = $("scale");
  el.textContent = scale === 1 ? "time scale ×1 (real time)" : `time scale ×${scale} (slow motion)`;
  el.classList.toggle("slow", scale !== 1);
}

// -- the stream ------------------------------------------------------------------------------

function onMessage(message) {
  switch (message.type) {
    case "picture":
      view.nodes.clear();
      $("nodes").innerHTML = "";
      $("narration").innerHTML = "";
      $("requests").innerHTML = "";
      view.clockOffset = message.now - Date.now() / 1000;
      view.actions = message.actions;
      view.canCut = message.can_cut;
      view.processes = message.processes;
      document.body.classList.toggle("harness", message.actions.length > 0);
      $("title").textContent = message.title;
      for (const n of message.nodes) { takeNode(n); if (n.last) setScale(n.last.time_scale); }
      for (const line of message.narration) addNarration(line);
      for (const r of message.requests) addRequest(r);
      break;
    case "event": {
      const n = takeNode(message.node);
      const ev = message.event;
      setScale(ev.time_scale);
      if (ev.text && (!ev.routine || $("routine").checked)) addNarration({ node_id: ev.node_id, time: ev.time, text: ev.text });
      if (n) for (const msg of messagesOf(ev)) drawMessage(msg);
      break;
    }
    case "reach":
      takeNode(message.node);
      break;
    case "processes":
      view.processes = message.processes;
      break;
    case "request":
      addRequest(message.request);
      break;
  }
  view.dirty = true;
}

let retry = 250;
function connect() {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/events`);
  socket.onopen = () => { retry = 250; $("link").textContent = "live"; $("link").className = ""; };
  socket.onmessage = (e) => onMessage(JSON.parse(e.data));
  socket.onclose = () => {
    $("link").textContent = "view disconnected: retrying";
    $("link").className = "down";
    setTimeout(connect, retry);
    retry = Math.min(4000, retry * 2);
  };
}

async function act(action, body) {
  const response = await fetch(`/api/${action}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  return response.json();
}

document.addEventListener("click", (e) => {
  const b = e.target.closest("button[data-action]");
  if (!b) return;
  const action = b.dataset.action;
  const body = {};
  if (b.dataset.node) body.node = Number(b.dataset.node);
  if (["put", "get", "delete", "cas"].includes(action)) {
    body.key = $("key").value;
    body.value = $("value").value;
    if (action === "cas") body.expected = $("absent").checked ? null : $("expected").value;
  }
  b.disabled = true;
  act(action, body).catch((err) => addRequest({ ok: false, text: `${action}: ${err}`, time: Date.now() / 1000, took: 0 }))
    .finally(() => { b.disabled = false; });
});

function frame() {
  // The timers drain continuously; everything else is redrawn when something changed.
  render();
  setTimeout(() => requestAnimationFrame(frame), 100);
}

connect();
frame();
