// The compare page: the jobs named in ?jobs=A,B,..., or the members of ?sweep=S (labelled by their own values),
// each followed live; overlaid curves, a table sortable by any column, and their gradient-through-time heatmaps on
// one colour scale. `window.gsCompare` is for tests.
//
// A browser opens at most six connections to one server, and each live stream holds one until its job ends: at
// most LIVE streams are open at once, and the other jobs wait their turn (their rows show their records meanwhile).
"use strict";

const LIVE = 4;
const MAX_JOBS = 12;

(async () => {
  const $ = (id) => document.getElementById(id);
  GS.header("/compare");
  const query = new URLSearchParams(location.search);
  let chosen = (query.get("jobs") || "").split(",").filter(Boolean);
  const labels = new Map();  // job id -> its sweep values, "lr=0.5 num_steps=5"
  const sweepId = query.get("sweep") || "";
  const S = (j) => j.summary || {};
  const followed = new Map();  // job id -> {job, history, stream: its state ("live", "ended", ...), canvas}
  const page = window.gsCompare = {followed};
  const COLUMNS = [
    ["job", (j) => j.id], ["state", (j) => j.state], ["member", (j) => labels.get(j.id) || "–"], ["model", (j) => `${j.spec.model} H${j.spec.hidden_size}`],
    ["truncation", (j) => j.spec.truncation], ["lr", (j) => GS.n(j.spec.lr)], ["batch", (j) => GS.n(j.spec.batch_size)],
    ["steps", (j) => GS.n(j.last_step)], ["train loss", (j) => GS.n(S(j).train_loss)],
    ["train ppl", (j) => GS.n(S(j).train_perplexity)], ["best val loss", (j) => GS.n(S(j).best_val_loss)],
    ["best val ppl", (j) => GS.n(S(j).best_val_perplexity)], ["tokens/s", (j) => GS.n(S(j).tokens_per_sec)],
    ["clipped %", (j) => 100 * GS.n(S(j).clip_fraction)],
  ];
  let sortBy = 8, ascending = true;
  let charts = null;

  const sweeps = (await GS.api("/api/sweeps")).sweeps;
  $("sweep").innerHTML += sweeps.map((w) => `<option value="${GS.esc(w.id)}"${w.id === sweepId ? " selected" : ""}>` +
    `${GS.esc(w.name || w.id)} (${w.members.length} members)</option>`).join("");
  $("sweep").onchange = (e) => { location.search = e.target.value ? `?sweep=${encodeURIComponent(e.target.value)}` : ""; };
  let notice = "";
  if (sweepId) {
    const {sweep} = await GS.api(`/api/sweeps/${encodeURIComponent(sweepId)}`);
    const order = sweep.spec.axes ? sweep.spec.axes.map((a) => a.field) : [];
    const members = sweep.members.filter((m) => m.job && m.job.id);
    for (const m of members) {
      const keys = Object.keys(m.values || {}).sort((a, b) => {
        const i = order.indexOf(a), j = order.indexOf(b);
        return (i < 0 ? order.length : i) - (j < 0 ? order.length : j) || a.localeCompare(b);
      });
      labels.set(m.job.id, keys.map((k) => `${k}=${m.values[k]}`).join(" "));
    }
    // The best held-out losses first, so that a large sweep shows the members worth comparing.
    const best = (m) => (m.job.summary && m.job.summary.best_step ? m.job.summary.best_val_loss : Infinity);
    members.sort((a, b) => best(a) - best(b));
    chosen = members.slice(0, MAX_JOBS).map((m) => m.job.id);
    if (members.length > MAX_JOBS) notice = ` · the ${MAX_JOBS} of ${members.length} members with the lowest held-out loss`;
  }
  const all = (await GS.api("/api/jobs?limit=500")).jobs;
  function drawChoices() {
    $("choices").innerHTML = all.map((j) => `<label style="display:inline-block; margin:2px 12px 2px 0">` +
      `<input type="checkbox" data-pick="${GS.esc(j.id)}"${chosen.includes(j.id) ? " checked" : ""}> ` +
      `${GS.esc(j.id)} <span class="muted">${GS.esc(j.spec.model)} ${GS.esc(j.spec.dataset)} ${GS.esc(j.state)}</span></label>`).join("");
    $("chosen").textContent = `${chosen.length} chosen${notice}`;
  }
  function choose(ids) { location.search = ids.length ? `?jobs=${ids.map(encodeURIComponent).join(",")}` : ""; }
  $("choices").onchange = (e) => {
    const id = e.target.dataset.pick;
    choose(e.target.checked ? [...chosen, id] : chosen.filter((c) => c !== id));
  };
  $("select-matching").onclick = () => {
    const q = $("search").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const hits = all.filter((j) => q.every((w) => [j.id, j.spec.model, j.spec.dataset, j.state].join(" ")
      .toLowerCase().includes(w))).map((j) => j.id);
    choose([...new Set([...chosen, ...hits])]);
  };
  $("clear").onclick = () => choose([]);
  drawChoices();

  function drawTable() {
    const rows = [...followed.values()].map((f) => f.job);
    const key = COLUMNS[sortBy][1];
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      const c = typeof x === "number" || typeof y === "number"
        ? (Number.isFinite(x) ? x : Infinity) - (Number.isFinite(y) ? y : Infinity) : String(x).localeCompare(String(y));
      return ascending ? c : -c;
    });
    $("table").tHead.innerHTML = `<tr>${COLUMNS.map(([name], i) => `<th class="sortable${i > 4 ? " num" : ""}" data-col="${i}">` +
      `${name}${i === sortBy ? (ascending ? " ▲" : " ▼") : ""}</th>`).join("")}</tr>`;
    $("table").tBodies[0].innerHTML = rows.map((j) => `<tr data-job="${GS.esc(j.id)}">${COLUMNS.map(([name, f], i) => {
      const v = f(j);
      if (i === 0) return `<td><a href="/jobs/${encodeURIComponent(v)}">${GS.esc(v)}</a></td>`;
      if (i === 1) return `<td>${GS.stateBadge(v)}</td>`;
      if (name === "tokens/s") return `<td class="num">${GS.rate(v)}</td>`;
      return `<td class="${typeof v === "number" ? "num" : ""}">${typeof v === "number" ? GS.fmt(v) : GS.esc(v)}</td>`;
    }).join("")}</tr>`).join("");
  }
  $("table").onclick = (e) => {
    const col = e.target.closest("th") && Number(e.target.closest("th").dataset.col);
    if (col === undefined || col === null || Number.isNaN(col)) return;
    ascending = col === sortBy ? !ascending : true;
    sortBy = col;
    drawTable();
  };

  // Every job's points on one x axis (the union of their steps); a job without a point at a step has a gap.
  function overlay(column) {
    const steps = new Set();
    for (const f of followed.values()) for (const s of f.history.table.steps) steps.add(s);
    const xs = [...steps].sort((a, b) => a - b);
    const at = new Map(xs.map((s, i) => [s, i]));
    const ys = [...followed.values()].map((f) => {
      const y = new Array(xs.length).fill(null), t = f.history.table;
      t.steps.forEach((s, i) => { y[at.get(s)] = t.values[column][i]; });
      return y;
    });
    return [xs, ...ys];
  }

  function drawHeatmaps() {
    const columns = [...followed.values()].map((f) => f.history.heatColumns(0));
    const range = GS.heatmapRange(columns.flat());
    GS.drawLegend($("heat-legend"), range);
    [...followed.values()].forEach((f, i) => GS.drawHeatmap(f.canvas, columns[i], range));
  }

  const redraw = GS.throttled(() => {
    charts.train.setData(overlay("loss"));
    charts.val.setData(overlay("val_loss"));
    drawHeatmaps();
    drawTable();
  });

  for (const id of chosen) {
    try {
      const {job} = await GS.api(`/api/jobs/${encodeURIComponent(id)}`);
      followed.set(id, {job, history: new GS.JobHistory()});
    } catch (e) {
      $("chosen").textContent += ` · ${id}: ${e.message}`;
    }
  }
  const series = [...followed.keys()].map((id) => ({label: labels.get(id) || id}));
  charts = {train: GS.lineChart($("train-chart"), series, {yLabel: "loss (nats/token)"}),
            val: GS.lineChart($("val-chart"), series.map((s) => ({...s, points: GS.markers(5)})),
                              {yLabel: "loss (nats/token)"})};
  for (const [id, f] of followed) {
    const box = document.createElement("div");
    const about = labels.get(id) || `${f.job.spec.model} H${f.job.spec.hidden_size} ${f.job.spec.truncation}`;
    box.innerHTML = `<div><a href="/jobs/${encodeURIComponent(id)}">${GS.esc(id)}</a> <span class="muted">` +
      `${GS.esc(about)}</span></div><canvas class="heatmap"></canvas>`;
    $("heatmaps").appendChild(box);
    f.canvas = box.querySelector("canvas");
  }
  const waiting = [...followed.keys()];
  let open = 0;
  function next() {
    while (open < LIVE && waiting.length) start(waiting.shift());
  }
  function start(id) {
    const f = followed.get(id);
    open += 1;
    f.stream = "opening";
    GS.follow(id, (batch) => {
      f.history.add(batch);
      const last = GS.JobHistory.lastMetrics(batch);
      if (last) {
        f.job.last_step = last.step;
        f.job.summary = {...S(f.job), train_loss: last.loss, train_perplexity: last.perplexity,
                         tokens_per_sec: last.tokens_per_sec};
      }
      for (const e of batch.events || []) if (e.kind === "status") f.job.state = e.state;
      redraw();
    }, {onStatus: (s) => { f.stream = s; },
        onEnd: async () => {
          open -= 1;
          next();
          f.job = (await GS.api(`/api/jobs/${encodeURIComponent(id)}`)).job;
          redraw();
        }});
  }
  next();
  redraw();
})();
