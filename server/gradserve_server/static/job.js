// The job page: its record, and its events drawn as they arrive. `window.gsJob` is what tests and the
// benchmark read: the history gathered, and `caughtUp` once the events up to the page's load are drawn.
"use strict";

(async () => {
  const jobId = decodeURIComponent(location.pathname.split("/").pop());
  const $ = (id) => document.getElementById(id);
  // While the page catches up on a long history, it draws at most this often (and once it has it all).
  const CATCHING_UP_GAP_MS = 1000;
  const history = new GS.JobHistory();
  const page = window.gsJob = {id: jobId, history, caughtUp: false, draws: 0};
  GS.header("");
  $("compare").href = `/compare?jobs=${encodeURIComponent(jobId)}`;

  let {job, newest_cursor: newest} = await GS.api(`/api/jobs/${encodeURIComponent(jobId)}`);
  // Opened before the charts are built, so that the history is on its way meanwhile.
  GS.follow(jobId, (batch, id) => {
    history.add(batch);
    page.lastCursor = id;
    const last = GS.JobHistory.lastMetrics(batch);
    if (last) {
      job.last_step = last.step;
      job.summary = {...(job.summary || {}), train_loss: last.loss, train_perplexity: last.perplexity,
                     tokens_per_sec: last.tokens_per_sec};
    }
    const statuses = (batch.events || []).filter((e) => e.kind === "status");
    if (statuses.length) {
      job.state = statuses[statuses.length - 1].state;
      // The record says more (the reason, the worker, the summary); while the history comes in, once at the end.
      if (page.caughtUp) refreshJob(); else page.refreshWhenCaughtUp = true;
    }
    redraw();
  }, {
    onStatus: (s) => {
      $("live").textContent = s;
      $("live").className = s === "live" ? "live on" : "live";
      page.stream = s;
    },
    onEnd: () => refreshJob(),
  });
  const clip = GS.n(job.spec.clip_norm);
  const charts = {
    loss: [GS.lineChart($("loss-chart"), [{label: "train"}, {label: "val", points: GS.markers(5)}],
                        {yLabel: "loss (nats/token)"}), ["loss", "val_loss"]],
    ppl: [GS.lineChart($("ppl-chart"), [{label: "train"}, {label: "val", points: GS.markers(5)}],
                       {yLabel: "perplexity", log: true}), ["perplexity", "val_perplexity"]],
    grad: [GS.lineChart($("grad-chart"), [
      {label: "‖g‖"},
      {label: "clipped", stroke: "#c62828", paths: () => null, points: GS.markers(6, "#c62828")},
      {label: `clip ${GS.fmt(clip)}`, stroke: "#999", dash: [6, 4], width: 1}], {yLabel: "gradient norm"}),
      ["grad_norm", "clipped_norm", "clip"]],
    lr: [GS.lineChart($("lr-chart"), [{label: "lr"}], {yLabel: "learning rate"}), ["lr"]],
    tps: [GS.lineChart($("tps-chart"), [{label: "tokens/s"}], {yLabel: "tokens/s"}), ["tokens_per_sec"]],
  };
  page.charts = charts;
  $("clip-note").textContent = clip ? `(clipped above ${GS.fmt(clip)})` : "(no clipping)";
  let spectral = null, spectralKeys = [];

  function drawFacts() {
    const s = job.summary || {};
    const facts = [
      ["model", `${job.spec.model} H${job.spec.hidden_size}×${job.spec.num_layers}`],
      ["dataset", job.spec.dataset], ["truncation", job.spec.truncation], ["progress", GS.progress(job)],
      ["train loss", GS.fmt(s.train_loss)], ["train ppl", GS.fmt(s.train_perplexity)],
      ["best val ppl", GS.fmt(s.best_val_perplexity)], ["tokens/s", GS.rate(s.tokens_per_sec)],
      ["clipped", s.clip_fraction !== undefined ? `${(100 * GS.n(s.clip_fraction)).toFixed(1)} %` : "–"],
      ["attempt", job.attempt], ["worker", job.worker || "–"], ["created", GS.when(job.created_at)],
    ];
    $("facts").innerHTML = facts.map(([k, v]) => `<div><b>${k}</b>${k === "progress" ? v : GS.esc(v)}</div>`).join("");
    $("title").textContent = job.id;
    $("state").innerHTML = GS.stateBadge(job.state);
    $("reason").textContent = job.reason || job.waiting || "";
    $("cancel").hidden = !["QUEUED", "RUNNING"].includes(job.state);
    document.title = `${job.id} · gradserve`;
  }

  function drawSpectral() {
    if (!history.probes.length) return;
    const keys = [];
    for (const p of history.probes) for (const s of p.spectral_norms) {
      const k = s.gate ? `${s.name} ${s.gate}` : s.name;
      if (!keys.includes(k)) keys.push(k);
    }
    if (!keys.length) return;
    if (!spectral || keys.length !== spectralKeys.length) {
      $("spectral-chart").innerHTML = "";
      spectral = GS.lineChart($("spectral-chart"), keys.map((k) => ({label: k})), {yLabel: "σ_max"});
      spectralKeys = keys;
    }
    $("spectral-empty").hidden = true;
    const xs = history.probes.map((p) => p.step);
    const ys = keys.map((k) => history.probes.map((p) => {
      const s = p.spectral_norms.find((s) => (s.gate ? `${s.name} ${s.gate}` : s.name) === k);
      return s ? s.sigma : null;
    }));
    spectral.setData([xs, ...ys]);
  }

  function drawHeatmap() {
    if (!history.probes.length) return;
    const layers = Math.max(...history.probes.map((p) => p.grad_through_time.length));
    const select = $("layer");
    if (layers > 1 && select.options.length !== layers) {
      select.innerHTML = Array.from({length: layers}, (_, i) => `<option value="${i}">layer ${i}</option>`).join("");
      select.hidden = false;
    }
    const columns = history.heatColumns(Number(select.value || 0));
    const range = GS.heatmapRange(columns);
    $("heat-empty").hidden = true;
    $("heatmap").hidden = false;
    GS.drawHeatmap($("heatmap"), columns, range);
    GS.drawLegend($("heat-legend"), range);
  }
  $("layer").onchange = drawHeatmap;

  function drawTimeline() {
    $("timeline").innerHTML = history.statuses.map((s) => {
      const bits = [`attempt ${s.attempt}`];
      if (s.worker) bits.push(`on ${GS.esc(s.worker)}`);
      if (s.step) bits.push(`step ${s.step}`);
      if (s.resumed_from_step) bits.push(`resumed from step ${s.resumed_from_step}`);
      const reason = s.reason ? `<div class="muted">${GS.esc(s.reason)}</div>` : "";
      return `<li>${GS.stateBadge(s.state)} <span class="muted">${new Date(s.time * 1000).toLocaleTimeString()}</span>` +
        ` · ${bits.join(" · ")}${reason}</li>`;
    }).join("");
    $("checkpoints").innerHTML = history.checkpoints.slice().reverse().map((c) =>
      `<tr><td class="num">${c.step}</td><td class="num">${GS.bytes(c.size_bytes)}</td><td>${c.kept}</td>` +
      `<td>${new Date(c.time * 1000).toLocaleTimeString()}</td></tr>`).join("");
    $("download").innerHTML = history.checkpoints.length
      ? `<a href="/api/jobs/${encodeURIComponent(jobId)}/checkpoint">Download the latest checkpoint</a>` : "";
  }

  const redraw = GS.throttled(() => {
    const t = history.table;
    t.values.clip = t.steps.map(() => (clip ? clip : null));
    for (const [plot, columns] of Object.values(charts)) plot.setData(t.data(columns));
    drawHeatmap();
    drawSpectral();
    drawTimeline();
    drawFacts();
    page.draws += 1;
    if (!page.caughtUp && historyIn()) {
      page.caughtUp = true;
      page.caughtUpAt = performance.now();
      if (page.refreshWhenCaughtUp) refreshJob();
    }
  }, () => (page.caughtUp || historyIn() ? 0 : CATCHING_UP_GAP_MS));
  // Whether the events up to the newest one when the page loaded have all arrived.
  const historyIn = () => !newest || cursorAfter(page.lastCursor, newest);

  function cursorAfter(a, b) {
    if (!a) return false;
    const [am, as] = a.split("-").map(Number), [bm, bs] = b.split("-").map(Number);
    return am > bm || (am === bm && as >= bs);
  }

  let refreshing = null, askAgain = false;
  async function refreshJob() {
    // Coalesced: a burst of status events asks once, and once more after a request already in flight, whose
    // answer may predate them.
    if (refreshing) { askAgain = true; return; }
    // The record changes the facts alone: the charts are the events'.
    refreshing = GS.api(`/api/jobs/${encodeURIComponent(jobId)}`).then((r) => { job = r.job; drawFacts(); })
      .catch(() => {}).finally(() => {
        refreshing = null;
        if (askAgain) { askAgain = false; refreshJob(); }
      });
  }

  drawFacts();
  redraw();

  $("cancel").onclick = async () => {
    if (!confirm(`Cancel ${jobId}?`)) return;
    try {
      await GS.post(`/api/jobs/${encodeURIComponent(jobId)}/cancel`);
      $("action-error").textContent = "";
      // Not the answer's record: the stream's CANCELLED may have come first, and the answer would undo it.
      refreshJob();
    } catch (e) {
      $("action-error").textContent = e.message;
    }
  };
  $("generate").onclick = async () => {
    const out = $("generated");
    $("generate").disabled = true;
    out.textContent = "…";
    try {
      const r = await GS.post(`/api/jobs/${encodeURIComponent(jobId)}/generate`, {
        prefix: $("prefix").value, num_tokens: Number($("tokens").value), temperature: Number($("temperature").value)});
      out.textContent = `${$("prefix").value}${r.text}`;
      out.title = `from the checkpoint at step ${r.step}`;
    } catch (e) {
      out.innerHTML = `<span class="error">${GS.esc(e.message)}</span>`;
    } finally {
      $("generate").disabled = false;
    }
  };
})();
