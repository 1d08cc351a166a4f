// gradserve dashboard: what every page shares. Plain browser JavaScript, loaded as it is (no build step);
// the charts are uPlot (vendor/), the heatmaps a canvas of their own.
"use strict";

const GS = (() => {
  let session = null;

  async function api(path, options = {}) {
    const reply = await fetch(path, {credentials: "same-origin", ...options});
    if (reply.status === 401) {
      location.href = "/login";
      throw new Error("this server needs a token");
    }
    const body = await reply.json().catch(() => ({}));
    if (!reply.ok) throw new Error(body.error || `${reply.status} ${reply.statusText}`);
    return body;
  }

  async function getSession() {
    if (!session) session = await api("/api/session");
    return session;
  }

  // The calls that change something: POSTs carrying the session's CSRF value.
  async function post(path, body) {
    const s = await getSession();
    return api(path, {method: "POST", body: JSON.stringify(body || {}),
                      headers: {"Content-Type": "application/json", "X-CSRF-Token": s.csrf}});
  }

  // A job's events, from the start and then live, each exactly once: `onEvents(batch, cursor)` gets each
  // batch (see JobHistory.add) and the cursor of its last event. The server names each message by the
  // cursor of its last event; the browser reconnects a dropped stream by itself with that cursor
  // (Last-Event-ID), and a stream it gave up on (the server was down) is reopened here from it.
  function follow(jobId, onEvents, {onEnd, onStatus} = {}) {
    let last = "", source = null, stopped = false, timer = null;
    const status = (s) => onStatus && onStatus(s);
    function open() {
      const query = last ? `?cursor=${encodeURIComponent(last)}` : "";
      source = new EventSource(`/api/jobs/${encodeURIComponent(jobId)}/events${query}`);
      source.onopen = () => status("live");
      source.onmessage = (m) => {
        last = m.lastEventId || last;
        onEvents(JSON.parse(m.data), last);
      };
      source.addEventListener("end", () => { stop(); status("ended"); if (onEnd) onEnd(); });
      source.addEventListener("failed", (m) => { stop(); status("failed: " + JSON.parse(m.data).error); });
      source.onerror = () => {
        if (stopped) return;
        status("reconnecting");
        if (source.readyState === EventSource.CLOSED) {
          clearTimeout(timer);
          timer = setTimeout(open, 1000);
        }
      };
    }
    function stop() {
      stopped = true;
      clearTimeout(timer);
      if (source) source.close();
    }
    // A page left for another can be kept whole (the back/forward cache) with its stream still open, holding
    // one of the six connections a browser makes to a server: the seventh page opened after it waited about
    // a minute for one. Closed when the page is left, and reopened from the last cursor if it is shown again.
    addEventListener("pagehide", () => {
      clearTimeout(timer);
      if (source) source.close();
    });
    addEventListener("pageshow", (e) => { if (e.persisted && !stopped) open(); });
    open();
    return {stop, cursor: () => last};
  }

  // Redraws at most once a frame, however many batches arrive in it, and no sooner than `gapMs()` after the
  // last redraw, as `gapMs()` says at each call: a page catching up on a long history draws it seldom, and
  // once more as soon as it has it all, not when the gap it was waiting out ends.
  function throttled(draw, gapMs = () => 0) {
    let timer = null, frame = null, last = 0;
    const schedule = () => {
      if (frame !== null) return;
      clearTimeout(timer);
      timer = null;
      const wait = last + gapMs() - performance.now();
      if (wait > 0) timer = setTimeout(schedule, wait);
      else frame = requestAnimationFrame(() => { frame = null; last = performance.now(); draw(); });
    };
    return schedule;
  }

  // ------------------------------------------------------------------ formatting

  const n = (v) => (v === undefined || v === null || v === "" ? NaN : Number(v));
  function fmt(v, digits = 3) {
    v = n(v);
    if (!Number.isFinite(v)) return "–";
    if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) return v.toExponential(2);
    return Number(v.toPrecision(digits)).toLocaleString();
  }
  function rate(v) {
    v = n(v);
    if (!Number.isFinite(v) || v === 0) return "–";
    return v >= 1e6 ? `${(v / 1e6).toFixed(2)}M/s` : v >= 1e3 ? `${(v / 1e3).toFixed(1)}k/s` : `${v.toFixed(0)}/s`;
  }
  function bytes(v) {
    v = n(v);
    if (!Number.isFinite(v)) return "–";
    return v >= 2 ** 30 ? `${(v / 2 ** 30).toFixed(1)} GiB` : v >= 2 ** 20 ? `${(v / 2 ** 20).toFixed(1)} MiB`
      : `${(v / 1024).toFixed(1)} KiB`;
  }
  function ago(iso) {
    if (!iso) return "–";
    const s = (Date.now() - Date.parse(iso)) / 1000;
    return s < 90 ? `${Math.max(0, s).toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago`
      : `${(s / 3600).toFixed(1)} h ago`;
  }
  function when(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }
  function esc(s) {
    return String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
  }
  function stateBadge(state) { return `<span class="state ${esc(state)}">${esc(state)}</span>`; }
  function progress(job) {
    const max = n(job.spec.max_steps), step = n(job.last_step) || 0;
    const pct = max ? Math.min(100, (100 * step) / max) : 0;
    return `<span class="bar"><span style="width:${pct.toFixed(1)}%"></span></span> ` +
      `<span class="muted">${step.toLocaleString()} / ${max ? max.toLocaleString() : "?"}</span>`;
  }

  async function header(here) {
    const links = [["/", "Jobs"], ["/compare", "Compare"], ["/workers", "Workers"]];
    const nav = links.map(([href, label]) => `<a href="${href}"${href === here ? ' class="here"' : ""}>${label}</a>`);
    const el = document.querySelector("header");
    el.innerHTML = `<span class="brand">gradserve</span>${nav.join("")}<span class="who"></span>`;
    const s = await getSession();
    if (s.auth) {
      el.querySelector(".who").innerHTML = `tenant <b>${esc(s.tenant)}</b>`;
      const form = document.createElement("form");
      form.method = "post";
      form.action = "/logout";
      form.innerHTML = `<button type="submit">Log out</button>`;
      el.appendChild(form);
    }
  }

  // ------------------------------------------------------------------ charts

  const PALETTE = ["#2f6fde", "#e0532b", "#1a9e5c", "#9b51e0", "#d4a106", "#11a3b8", "#d6336c", "#5f6b7a",
                   "#7cb342", "#8d6e63"];

  // A uPlot line chart over `data` ([xs, ys...]); `series` are uPlot series options after the x axis.
  function lineChart(el, series, {xLabel = "step", yLabel = "", log = false, height = 220} = {}) {
    const width = Math.max(300, el.clientWidth || 460);
    const opts = {
      width, height,
      scales: {x: {time: false}, y: log ? {distr: 3} : {}},
      axes: [{label: xLabel, size: 36}, {label: yLabel, size: 56}],
      legend: {live: true},
      cursor: {drag: {x: true, y: false}},
      series: [{label: xLabel}, ...series.map((s, i) => ({stroke: PALETTE[i % PALETTE.length], width: 1.5,
                                                           spanGaps: true, points: {show: false}, ...s}))],
    };
    const plot = new uPlot(opts, [[], ...series.map(() => [])], el);
    new ResizeObserver(() => plot.setSize({width: Math.max(300, el.clientWidth), height})).observe(el);
    return plot;
  }

  // uPlot points options for markers on a series (a sparse one, such as validation, or the clipped steps): at
  // most one every `size` pixels across, on the largest value of each run. A long job has thousands of such
  // points, and a circle for each was most of the time its page took to draw, for nothing more to see; the
  // largest, not the first, so that a run of markers follows the curve's top instead of drawing a pattern.
  function markers(size, fill) {
    return {show: false, size, ...(fill ? {fill} : {}), filter: (u, i) => {
      const xs = u.data[0], ys = u.data[i], [from, to] = u.series[0].idxs, shown = [];
      let best = -1, end = -Infinity;
      for (let j = from; j <= to; j++) {
        if (ys[j] == null) continue;
        const x = u.valToPos(xs[j], "x");
        if (x >= end) {
          if (best >= 0) shown.push(best);
          best = j;
          end = x + size;
        } else if (ys[j] > ys[best]) {
          best = j;
        }
      }
      if (best >= 0) shown.push(best);
      return shown;
    }};
  }

  // ------------------------------------------------------------------ heatmaps

  // Colours from low to high (a perceptual ramp, dark blue to yellow), for log10 of a gradient norm.
  const RAMP = [[48, 18, 59], [65, 69, 171], [57, 118, 211], [33, 163, 191], [38, 199, 141], [120, 222, 80],
                [190, 225, 56], [244, 197, 52], [253, 136, 41], [222, 64, 23], [122, 4, 3]];
  function colour(t) {
    t = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
    const i = Math.min(RAMP.length - 2, Math.floor(t)), f = t - i, a = RAMP[i], b = RAMP[i + 1];
    return [0, 1, 2].map((k) => Math.round(a[k] + f * (b[k] - a[k])));
  }

  // The gradient through time: one column per probe (training step), one row per position in the window
  // (top: the window's last step, where the loss is; bottom: its first). Colour is log10 ‖∂L/∂h_t‖ on the
  // scale [lo, hi], shared by every heatmap drawn with the same range.
  function heatmapRange(columns) {
    let lo = Infinity, hi = -Infinity;
    for (const col of columns) for (const v of col) if (v > 0) {
      const l = Math.log10(v);
      if (l < lo) lo = l;
      if (l > hi) hi = l;
    }
    return lo <= hi ? [lo, hi === lo ? lo + 1 : hi] : null;
  }
  function drawHeatmap(canvas, columns, range) {
    const rows = Math.max(0, ...columns.map((c) => c.length));
    canvas.dataset.columns = String(columns.length);
    if (!columns.length || !rows || !range) return;
    canvas.width = columns.length;
    canvas.height = rows;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(columns.length, rows);
    const [lo, hi] = range;
    columns.forEach((col, x) => {
      for (let t = 0; t < rows; t++) {
        const v = col[t], y = rows - 1 - t, at = 4 * (y * columns.length + x);
        const [r, g, b] = v > 0 ? colour((Math.log10(v) - lo) / (hi - lo)) : [230, 230, 235];
        image.data[at] = r; image.data[at + 1] = g; image.data[at + 2] = b; image.data[at + 3] = 255;
      }
    });
    ctx.putImageData(image, 0, 0);
  }
  function drawLegend(el, range) {
    if (!range) { el.textContent = ""; return; }
    el.innerHTML = `<span>10<sup>${range[0].toFixed(1)}</sup></span><canvas width="160" height="1"></canvas>` +
      `<span>10<sup>${range[1].toFixed(1)}</sup></span><span>‖∂L/∂h<sub>t</sub>‖</span>`;
    const ctx = el.querySelector("canvas").getContext("2d");
    for (let x = 0; x < 160; x++) {
      const [r, g, b] = colour(x / 159);
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(x, 0, 1, 1);
    }
  }

  // ------------------------------------------------------------------ one job's curves

  // Points by training step, in step order: a job resumed from a checkpoint reports some steps again, and the
  // later report replaces the earlier one. `columns` name the values each step may carry.
  class StepTable {
    constructor(columns) {
      this.columns = columns;
      this.steps = [];
      this.values = Object.fromEntries(columns.map((c) => [c, []]));
    }
    row(step) {
      const steps = this.steps;
      let i = steps.length;
      if (i && steps[i - 1] >= step) {
        let lo = 0, hi = steps.length;
        while (lo < hi) { const mid = (lo + hi) >> 1; if (steps[mid] < step) lo = mid + 1; else hi = mid; }
        if (steps[lo] === step) return lo;
        i = lo;
      }
      // Nearly always a step after the last: appended, not spliced in, which costs a long history's page less.
      if (i === steps.length) {
        steps.push(step);
        for (const c of this.columns) this.values[c].push(null);
      } else {
        steps.splice(i, 0, step);
        for (const c of this.columns) this.values[c].splice(i, 0, null);
      }
      return i;
    }
    // For each i, `columns[name][i]` as the value of column `name` at step `steps[i]`.
    setColumns(steps, columns) {
      const into = Object.keys(columns).map((c) => [this.values[c], columns[c]]);
      for (let i = 0; i < steps.length; i++) {
        const row = this.row(steps[i]);
        for (const [values, given] of into) values[row] = given[i];
      }
    }
    data(columns) { return [this.steps, ...columns.map((c) => this.values[c])]; }
  }

  // What a job's events say, gathered: the curves, the probes, the status changes, the checkpoints.
  class JobHistory {
    constructor() {
      this.table = new StepTable(["loss", "perplexity", "val_loss", "val_perplexity", "grad_norm", "clipped_norm",
                                  "lr", "tokens_per_sec"]);
      this.probes = [];
      this.statuses = [];
      this.checkpoints = [];
      this.metricCursors = [];
    }
    // A batch as the server sends it: metrics and evaluations as columns, the rest as objects.
    add(batch) {
      const m = batch.metrics, e = batch.evaluation;
      if (m) {
        for (const cursor of m.cursor) this.metricCursors.push(cursor);
        this.table.setColumns(m.step, {loss: m.loss, perplexity: m.perplexity, grad_norm: m.grad_norm,
                                       clipped_norm: m.grad_norm.map((g, i) => (m.clipped[i] ? g : null)),
                                       lr: m.lr, tokens_per_sec: m.tokens_per_sec});
      }
      if (e) this.table.setColumns(e.step, {val_loss: e.loss, val_perplexity: e.perplexity});
      for (const event of batch.events || []) {
        if (event.kind === "probe") this.probes.push(event);
        else if (event.kind === "status") this.statuses.push(event);
        else if (event.kind === "checkpoint") this.checkpoints.push(event);
      }
    }
    // The last metrics report of a batch, if it has one.
    static lastMetrics(batch) {
      const m = batch.metrics;
      if (!m) return null;
      const i = m.step.length - 1;
      return {step: m.step[i], loss: m.loss[i], perplexity: m.perplexity[i], tokens_per_sec: m.tokens_per_sec[i]};
    }
    // One layer's gradient-through-time columns, a probe each.
    heatColumns(layer) { return this.probes.map((p) => p.grad_through_time[layer] || []); }
  }

  return {api, post, getSession, follow, throttled, fmt, rate, bytes, ago, when, esc, stateBadge, progress, header,
          lineChart, markers, heatmapRange, drawHeatmap, drawLegend, JobHistory, StepTable, PALETTE, n};
})();
