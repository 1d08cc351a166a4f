// The jobs page: the newest jobs, read again every POLL_MS while the page is open.
"use strict";

(() => {
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);
  const selected = new Set();
  const params = new URLSearchParams(location.search);
  $("state").value = params.get("state") || "";
  $("search").value = params.get("q") || "";
  let jobs = [];
  GS.header("/");

  function matches(job, q) {
    if (!q) return true;
    const text = [job.id, job.spec.model, job.spec.dataset, job.worker, job.state, job.queue].join(" ").toLowerCase();
    return q.toLowerCase().split(/\s+/).every((w) => text.includes(w));
  }

  function draw() {
    const q = $("search").value.trim();
    const shown = jobs.filter((j) => matches(j, q));
    $("jobs").innerHTML = shown.map((j) => {
      const s = j.summary || {};
      const link = `/jobs/${encodeURIComponent(j.id)}`;
      return `<tr data-job="${GS.esc(j.id)}">` +
        `<td><input type="checkbox" data-pick="${GS.esc(j.id)}"${selected.has(j.id) ? " checked" : ""}></td>` +
        `<td><a href="${link}">${GS.esc(j.id)}</a></td><td>${GS.stateBadge(j.state)}</td>` +
        `<td>${GS.esc(j.spec.model)} H${GS.esc(j.spec.hidden_size)}</td><td>${GS.esc(j.spec.dataset)}</td>` +
        `<td>${GS.progress(j)}</td><td class="num">${GS.fmt(s.train_loss)}</td>` +
        `<td class="num">${GS.fmt(s.train_perplexity)}</td><td class="num">${GS.fmt(s.best_val_perplexity)}</td>` +
        `<td class="num">${GS.rate(s.tokens_per_sec)}</td><td>${GS.esc(j.worker || "")}</td>` +
        `<td title="${GS.esc(GS.when(j.created_at))}">${GS.ago(j.created_at)}</td></tr>`;
    }).join("");
    $("empty").hidden = jobs.length > 0;
    $("compare").disabled = selected.size < 1;
  }

  async function poll() {
    const state = $("state").value;
    try {
      jobs = (await GS.api(`/api/jobs?limit=200${state ? `&state=${state}` : ""}`)).jobs;
      $("error").textContent = "";
      $("live").textContent = `updated ${new Date().toLocaleTimeString()}`;
      $("live").className = "live on";
      draw();
    } catch (e) {
      $("error").textContent = e.message;
      $("live").className = "live";
    }
  }

  function remember() {
    const p = new URLSearchParams();
    if ($("state").value) p.set("state", $("state").value);
    if ($("search").value.trim()) p.set("q", $("search").value.trim());
    history.replaceState(null, "", p.toString() ? `?${p}` : "/");
  }
  $("state").onchange = () => { remember(); poll(); };
  $("search").oninput = () => { remember(); draw(); };
  $("jobs").onchange = (e) => {
    const id = e.target.dataset.pick;
    if (!id) return;
    if (e.target.checked) selected.add(id); else selected.delete(id);
    $("compare").disabled = selected.size < 1;
  };
  $("compare").onclick = () => { location.href = `/compare?jobs=${[...selected].map(encodeURIComponent).join(",")}`; };
  poll();
  setInterval(poll, POLL_MS);
})();
