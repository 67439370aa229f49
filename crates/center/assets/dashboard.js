// pushgrid admin dashboard: polls /dashboard/data every second with the
// page's ?token= as a Bearer header, and draws the last five minutes.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const POLL_MS = 1000;
const KEEP = 300;
const history = { t: [], connections: [], rateIn: [], rateOut: [], queue: [], p50: [], p99: [], wait: [], delivery: [] };
let previous = null;

function el(id) { return document.getElementById(id); }

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
}

function uptime(startedMs, nowMs) {
  const s = Math.max(0, Math.round((nowMs - startedMs) / 1000));
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return Math.round(s / 3600) + " h";
}

function push(series, value) {
  series.push(value);
  if (series.length > KEEP) series.shift();
}

function chart(id, lines) {
  const canvas = el(id);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 400, height = canvas.clientHeight || 140;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  let max = 1;
  for (const line of lines) for (const v of line.values) if (v > max) max = v;
  max *= 1.1;
  g.strokeStyle = "#e2e8f0"; g.fillStyle = "#718096"; g.font = "11px sans-serif"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = height - 14 - (height - 24) * i / 4;
    g.beginPath(); g.moveTo(36, y); g.lineTo(width, y); g.stroke();
    const label = max * i / 4;
    g.fillText(label >= 10 ? Math.round(label) : label.toFixed(1), 0, y + 4);
  }
  for (const line of lines) {
    const n = line.values.length;
    if (n < 1) continue;
    g.strokeStyle = line.color; g.lineWidth = 2; g.beginPath();
    line.values.forEach((v, i) => {
      const x = 36 + (width - 40) * (KEEP - n + i) / (KEEP - 1);
      const y = height - 14 - (height - 24) * v / max;
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
  }
}

function render(data) {
  const totals = data.totals;
  const connections = el("connections-total");
  connections.textContent = String(totals.connections);
  connections.dataset.value = String(totals.connections);
  el("nodes-healthy").textContent = totals.healthy_nodes + " / " + totals.nodes;
  el("queue-depth").textContent = String(totals.route_queue_depth);
  el("latency-p99").textContent = (totals.store_p99_seconds * 1000).toFixed(1);

  let rateIn = 0, rateOut = 0;
  if (previous) {
    const seconds = Math.max(0.001, (data.time_ms - previous.time_ms) / 1000);
    rateIn = Math.max(0, totals.messages_in - previous.totals.messages_in) / seconds;
    rateOut = Math.max(0, totals.messages_out - previous.totals.messages_out) / seconds;
  }
  previous = data;
  el("rate-in").textContent = rateIn.toFixed(1);
  el("rate-out").textContent = rateOut.toFixed(1);

  push(history.connections, totals.connections);
  push(history.rateIn, rateIn);
  push(history.rateOut, rateOut);
  push(history.queue, totals.route_queue_depth);
  push(history.p50, totals.store_p50_seconds * 1000);
  push(history.p99, totals.store_p99_seconds * 1000);
  push(history.wait, totals.route_p99_seconds * 1000);
  push(history.delivery, totals.delivery_p99_seconds * 1000);
  chart("chart-connections", [{ values: history.connections, color: "#2f855a" }]);
  chart("chart-rates", [{ values: history.rateIn, color: "#3182ce" }, { values: history.rateOut, color: "#dd6b20" }]);
  chart("chart-queue", [{ values: history.queue, color: "#805ad5" }]);
  chart("chart-latency", [
    { values: history.p50, color: "#3182ce" },
    { values: history.p99, color: "#805ad5" },
    { values: history.wait, color: "#dd6b20" },
    { values: history.delivery, color: "#e53e3e" },
  ]);

  const rooms = el("rooms");
  rooms.replaceChildren();
  for (const room of data.rooms) {
    const row = document.createElement("tr");
    row.dataset.room = room.id;
    cell(row, room.id); cell(row, room.addr); cell(row, String(room.connections));
    rooms.appendChild(row);
  }
  const nodes = el("nodes");
  nodes.replaceChildren();
  for (const node of data.nodes) {
    const row = document.createElement("tr");
    row.dataset.node = node.id;
    cell(row, node.id); cell(row, node.role);
    cell(row, node.healthy ? "healthy" : node.health, node.healthy ? "ok" : "down");
    cell(row, node.grpc_addr); cell(row, node.public_addr); cell(row, node.admin_addr);
    cell(row, uptime(node.started_ms, data.time_ms));
    nodes.appendChild(row);
  }
  const status = el("status");
  status.className = "";
  status.textContent = "updated " + new Date(data.time_ms).toLocaleTimeString() + " · view v" + data.view_version;
}

async function poll() {
  try {
    const response = await fetch("/dashboard/data", {
      headers: { "Authorization": "Bearer " + TOKEN },
      cache: "no-store",
    });
    if (!response.ok) throw new Error(response.status + " " + (await response.text()).trim());
    render(await response.json());
  } catch (error) {
    const status = el("status");
    status.className = "error";
    status.textContent = "cannot load data: " + error.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
