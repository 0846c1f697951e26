// The fedtune console: every page is drawn from the admin API (/api/v1) with the session cookie.
// Text from sites and users goes into the page as text nodes only (never innerHTML), so a site
// named "<img src=x onerror=alert(1)>" shows as those characters. Changes send the session's CSRF
// token; what a role may do is what the API allows it (the server decides, the page only hides
// buttons the role could not use).
"use strict";

const API = "/api/v1";
const REFRESH_MS = 3000; // while a job runs, a page checks this often whether it changed
let session = null;
let refreshTimer = null;

// While a job runs, the page asks one cheap question every REFRESH_MS (the jobs' statuses and rounds done:
// one API read, one audit record) and redraws itself (several reads) only when the answer changed.
let generation = 0; // each render starts a new one; a poll of an older one stops

function watch(signature, running) {
  if (!running) return;
  const mine = generation;
  const poll = async () => {
    let now;
    try { now = await currentSignature(); } catch (e) { now = null; } // a blip: ask again next time
    if (mine !== generation) return;
    if (now === null) { refreshTimer = setTimeout(poll, REFRESH_MS * 2); return; }
    if (now !== signature) render();
    else refreshTimer = setTimeout(poll, REFRESH_MS);
  };
  refreshTimer = setTimeout(poll, REFRESH_MS);
}

let currentSignature = async () => "";

function jobsSignature(jobs) {
  return jobs.map((j) => `${j.id}:${j.status}:${j.rounds_done}:${j.latest_version}`).join("|");
}

function watchJobs(jobs) {
  currentSignature = async () => jobsSignature((await api("GET", "/jobs?limit=200", undefined, { background: true })).items);
  watch(jobsSignature(jobs), jobs.some((j) => j.status === "running"));
}

class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

// ---- DOM helpers --------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// replaceChildren() with the empty places (null, false: what a role may not see) left out
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const enc = encodeURIComponent;
const can = (action) => session !== null && session.allowed.includes(action);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "-");
const short = (digest) => (digest ? digest.replace(/^sha256:/, "").slice(0, 12) : "-");
const fmt = (x, digits = 2) => (x === null || x === undefined ? "-" : Number(x).toFixed(digits));

function badge(status) {
  return el("span", { class: `badge badge-${String(status).replace(/[^a-z_]/g, "")}` }, status);
}

function toast(message, kind = "ok") {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.className = `toast-${kind}`;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

function section(title, ...children) {
  return el("section", {}, el("h2", {}, title), ...children);
}

function table(headers, rows, attrs = {}) {
  return el("table", attrs,
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "none"))));
}

// ---- the API --------------------------------------------------------------------------------

async function api(method, path, body, { raw = false, background = false } = {}) {
  const headers = { Accept: "application/json" };
  if (background) headers["X-Console-Background"] = "1"; // polling: does not keep an idle session alive
  if (method !== "GET") headers["X-CSRF-Token"] = session.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    location.assign("/console/sign-in");
    throw new ApiError(401, "the session ended: sign in again");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  if (raw) return response;
  return response.json();
}

async function action(label, method, path, body) {
  try {
    const result = await api(method, path, body);
    toast(`${label}: done`);
    await render();
    return result;
  } catch (e) {
    toast(`${label} refused: ${e.detail || e.message}`, "error");
    return null;
  }
}

// ---- pages ----------------------------------------------------------------------------------

async function federationPage(main) {
  const [clients, jobs] = await Promise.all([api("GET", "/clients?limit=200"), api("GET", "/jobs?limit=200")]);
  const lastRound = {};
  for (const job of jobs.items) {
    const rounds = (await api("GET", `/jobs/${enc(job.id)}/rounds?limit=200`)).items;
    for (const round of rounds) {
      for (const client of round.accepted) {
        const seen = lastRound[client];
        if (!seen || new Date(round.finished_at || 0) >= new Date(seen.finished_at || 0)) {
          lastRound[client] = { job: job.id, number: round.number, finished_at: round.finished_at };
        }
      }
    }
  }
  const budgets = await Promise.all(clients.items.map((c) => api("GET", `/clients/${enc(c.id)}/privacy/budget`)));
  const rows = clients.items.map((client, i) => {
    const budget = budgets[i];
    const last = lastRound[client.id];
    const bars = budget.jobs.map((j) => el("div", { class: "budget" },
      el("span", { class: "budget-label" }, `${j.job_id}: ${fmt(j.epsilon_spent)} / ${j.epsilon_budget === null ? "no cap" : fmt(j.epsilon_budget)}`),
      el("meter", { min: 0, max: j.epsilon_budget || Math.max(j.epsilon_spent, 1), value: j.epsilon_spent,
        high: (j.epsilon_budget || 1) * 0.8, optimum: 0, title: `epsilon spent on job ${j.job_id}` })));
    const lifetimeCap = budget.jobs.reduce((sum, j) => sum + (j.epsilon_budget || 0), 0);
    const lifetime = el("div", { class: "budget" },
      el("span", { class: "budget-label" }, `lifetime: ${fmt(budget.lifetime_epsilon)} (delta ${budget.lifetime_delta.toExponential(1)})`),
      el("meter", { min: 0, max: Math.max(lifetimeCap, budget.lifetime_epsilon, 1), value: budget.lifetime_epsilon,
        title: "every job composed; the agent enforces its own lifetime budget" }));
    const actions = [];
    if (can("client.rotate_keys") && client.status === "active") {
      actions.push(el("button", { type: "button", onclick: () => rotateKeys(client) }, "Rotate keys"));
    }
    if (can("client.revoke") && client.status === "active") {
      actions.push(el("button", { type: "button", class: "danger", onclick: () => {
        if (confirm(`Revoke ${client.id}? Its replies are rejected from then on.`)) {
          action(`revoke ${client.id}`, "POST", `/clients/${enc(client.id)}/revoke`);
        }
      } }, "Revoke"));
    }
    return el("tr", { "data-client": client.id },
      el("td", {}, el("strong", {}, client.id)), el("td", { class: "site-name" }, client.name), el("td", {}, client.org),
      el("td", {}, badge(client.status)),
      el("td", {}, client.flower_node_id === null ? "not registered" : `node ${client.flower_node_id}`),
      el("td", {}, last ? `${last.job} round ${last.number}` : "none yet"),
      el("td", { class: "budgets" }, bars.length ? bars : el("span", { class: "muted" }, "no spend"), lifetime),
      el("td", {}, actions));
  });
  fill(main,
    el("h1", {}, "Federation"),
    section("Sites", table(["Site", "Name", "Organization", "Status", "SuperNode", "Last round taken part in",
      "Epsilon spent (job budgets, lifetime)", ""], rows, { id: "sites" })),
    can("client.register") ? section("Register a site", registerForm()) : null);
  watchJobs(jobs.items);
}

function registerForm() {
  const input = (name, label, attrs = {}) => el("label", {}, label, el("input", { name, ...attrs }));
  const form = el("form", { id: "register", class: "grid" },
    input("id", "Client id", { required: true, placeholder: "hospital-d" }),
    input("org", "Organization", { required: true }),
    input("name", "Name", { required: true }),
    input("public_key", "Receipt key (ed25519:...)", { required: true }),
    input("node_public_key", "SuperNode key (optional, OpenSSH)"),
    el("button", { type: "submit" }, "Register"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form).entries());
    if (!data.node_public_key) delete data.node_public_key;
    action(`register ${data.id}`, "POST", "/clients", data);
  });
  return form;
}

function rotateKeys(client) {
  const publicKey = prompt(`New receipt key for ${client.id} (ed25519:..., empty: keep)`, "");
  if (publicKey === null) return;
  const nodeKey = prompt(`New SuperNode key for ${client.id} (OpenSSH, empty: keep)`, "");
  if (nodeKey === null) return;
  const body = {};
  if (publicKey.trim()) body.public_key = publicKey.trim();
  if (nodeKey.trim()) body.node_public_key = nodeKey.trim();
  action(`rotate keys of ${client.id}`, "POST", `/clients/${enc(client.id)}/keys`, body);
}

async function jobsPage(main) {
  const jobs = await api("GET", "/jobs?limit=200");
  const rows = jobs.items.map((job) => el("tr", { "data-job": job.id },
    el("td", {}, el("a", { href: `/console/jobs/${enc(job.id)}` }, job.id)), el("td", {}, badge(job.status)),
    el("td", {}, `${job.rounds_done} / ${job.config.rounds}`), el("td", {}, job.latest_version ?? "-"),
    el("td", {}, (job.config.clients || []).join(", ")), el("td", {}, when(job.created_at)),
    el("td", {}, when(job.finished_at))));
  fill(main, el("h1", {}, "Jobs"),
    section("All jobs", table(["Job", "Status", "Rounds", "Latest version", "Sites", "Created", "Finished"], rows,
      { id: "jobs" })),
    can("job.create") ? section("Create a job", createJobForm(jobs.items)) : null);
  watchJobs(jobs.items);
}

function createJobForm(jobs) {
  const template = jobs.length ? { ...jobs[0].config, id: `${jobs[0].id}-2` } : {
    id: "job-1", base_digest: "", clients: [], rounds: 10, min_clients: 2, norm_bound: 50.0,
    aggregation: { method: "ffa" }, lora: { rank: 8, ffa: true }, train: { batch_size: 64, steps: 5 },
    privacy: { target_epsilon: 8.0, delta: 1e-5 },
  };
  delete template.status;
  const area = el("textarea", { name: "config", rows: 14, spellcheck: "false" });
  area.value = JSON.stringify(template, null, 2);
  const form = el("form", { id: "create-job" },
    el("p", { class: "muted" }, "The job as POST /api/v1/jobs takes it (docs/deploy.md, the job's fields)."), area,
    el("button", { type: "submit" }, "Create"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    let body;
    try { body = JSON.parse(area.value); } catch (e) { toast(`not JSON: ${e.message}`, "error"); return; }
    action(`create job ${body.id}`, "POST", "/jobs", body);
  });
  return form;
}

function lineChart(title, series, { xLabel = "round", yLabel = "" } = {}) {
  const width = 520, height = 200, pad = 36;
  const points = series.flatMap((s) => s.points);
  if (!points.length) return el("figure", { class: "chart" }, el("figcaption", {}, title), el("p", { class: "muted" }, "no data yet"));
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  const [y0, y1] = [0, Math.max(...ys) * 1.1 || 1];
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (width - 2 * pad);
  const sy = (y) => height - pad - ((y - y0) / (y1 - y0)) * (height - 2 * pad);
  const colours = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"];
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title },
    svg("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, class: "axis" }),
    svg("line", { x1: pad, y1: pad, x2: pad, y2: height - pad, class: "axis" }),
    svg("text", { x: width / 2, y: height - 6, class: "tick", "text-anchor": "middle" }, xLabel),
    svg("text", { x: 4, y: pad - 10, class: "tick" }, `${yLabel} max ${fmt(y1 / 1.1)}`),
    svg("text", { x: pad, y: height - pad + 14, class: "tick", "text-anchor": "middle" }, x0),
    svg("text", { x: width - pad, y: height - pad + 14, class: "tick", "text-anchor": "middle" }, x1));
  series.forEach((s, i) => {
    const colour = colours[i % colours.length];
    const sorted = [...s.points].sort((a, b) => a[0] - b[0]);
    chart.append(svg("polyline", { points: sorted.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), fill: "none",
      stroke: colour, "stroke-width": 2 }));
    for (const [x, y] of sorted) chart.append(svg("circle", { cx: sx(x), cy: sy(y), r: 3, fill: colour }, svg("title", {}, `${s.name}: ${fmt(y, 3)} at ${x}`)));
  });
  const legend = el("p", { class: "legend" }, series.map((s, i) => el("span", { class: `swatch swatch-${i % colours.length}` }, s.name)));
  return el("figure", { class: "chart" }, el("figcaption", {}, title), chart, legend);
}

async function jobPage(main, jobId) {
  const job = await api("GET", `/jobs/${enc(jobId)}`);
  const [rounds, versions] = await Promise.all([
    api("GET", `/jobs/${enc(jobId)}/rounds?limit=200`), api("GET", `/jobs/${enc(jobId)}/adapters?limit=200`)]);
  const clients = job.config.clients || [];
  const ledgers = await Promise.all(clients.map((c) => api("GET", `/clients/${enc(c)}/privacy/ledger?limit=200`)
    .then((page) => page.items.filter((e) => e.job_id === jobId)).catch(() => [])));

  const buttons = [];
  const control = (name, label, states) => {
    if (can(`job.${name}`) && states.includes(job.status)) {
      buttons.push(el("button", { type: "button", id: `job-${name}`, class: name === "abort" ? "danger" : "",
        onclick: () => action(`${label} ${job.id}`, "POST", `/jobs/${enc(job.id)}/${name}`) }, label));
    }
  };
  control("start", "Start", ["created"]);
  control("pause", "Pause", ["running"]);
  control("resume", "Resume", ["paused"]);
  control("abort", "Abort", ["created", "running", "paused"]);

  const timeline = rounds.items.map((r) => {
    const refused = r.rejected || [];
    const seconds = r.started_at && r.finished_at ? (new Date(r.finished_at) - new Date(r.started_at)) / 1000 : null;
    return el("li", { class: `round round-${r.status}`, "data-round": r.number },
      el("span", { class: "round-number" }, `Round ${r.number}`), badge(r.status),
      el("span", {}, `${r.accepted.length} accepted, ${refused.length} refused`),
      seconds === null ? null : el("span", { class: "muted" }, `${fmt(seconds, 1)} s`),
      r.version === null ? null : el("span", { class: "muted" }, `version ${r.version}`),
      r.failure_reason ? el("span", { class: "reason" }, r.failure_reason) : null,
      refused.length ? el("ul", { class: "reasons" }, refused.map((x) => el("li", {}, `${x.client_id ?? "unknown node"}: ${x.reason_code ?? x.status}`))) : null);
  });
  const epsilonSeries = clients.map((c, i) => ({
    name: c, points: ledgers[i].filter((e) => e.round !== null).map((e) => [e.round, e.epsilon]) }));
  const countSeries = [
    { name: "accepted", points: rounds.items.map((r) => [r.number, r.accepted.length]) },
    { name: "refused", points: rounds.items.map((r) => [r.number, (r.rejected || []).length]) }];

  const versionRows = versions.items.map((v) => el("tr", { "data-version": v.version },
    el("td", {}, v.version), el("td", {}, el("code", { title: v.digest }, short(v.digest))),
    el("td", {}, v.parent_version ?? "-"), el("td", {}, v.round ?? "-"), el("td", {}, v.aggregation ?? "-"),
    el("td", {}, v.contributors.map((c) => `${c.client_id} (${c.records} records, epsilon ${fmt(c.epsilon)})`).join("; ") || "-"),
    el("td", {}, v.promoted ? "promoted" : ""), el("td", {}, when(v.created_at)),
    el("td", {}, can("adapter.download")
      ? el("a", { href: `${API}/jobs/${enc(jobId)}/adapters/${v.version}/download`, download: `${jobId}-v${v.version}.zip` }, "download")
      : null, " ", el("button", { type: "button", class: "link", onclick: (event) => showLineage(event.target, jobId, v.version) }, "lineage"))));

  fill(main,
    el("h1", {}, `Job ${job.id} `, badge(job.status)),
    el("p", { id: "job-progress" }, `${job.rounds_done} of ${job.config.rounds} rounds done; latest version ${job.latest_version ?? "-"}; sites ${clients.join(", ")}; aggregation ${job.config.aggregation?.method ?? "-"}`),
    buttons.length ? el("div", { class: "actions" }, buttons) : null,
    section("Rounds", el("ol", { class: "timeline", id: "rounds" }, timeline.length ? timeline : el("li", { class: "muted" }, "no round yet"))),
    section("Charts", el("div", { class: "charts" },
      lineChart("Epsilon of each site's attempt, by round (record-level, its own mechanism)", epsilonSeries, { yLabel: "epsilon" }),
      lineChart("Updates accepted and refused, by round", countSeries, { yLabel: "updates" })),
    el("p", { class: "muted" }, "The agents never send their training loss (it is not differentially private); held-out evaluation happens at the sites.")),
    section("Adapter versions", table(["Version", "Digest", "Parent", "Round", "Aggregation", "Contributors", "Promoted", "Created", "Files"], versionRows, { id: "versions" })));
  currentSignature = async () => jobsSignature([await api("GET", `/jobs/${enc(jobId)}`, undefined, { background: true })]);
  watch(jobsSignature([job]), job.status === "running");
}

async function showLineage(button, jobId, version) {
  try {
    const lineage = await api("GET", `/jobs/${enc(jobId)}/adapters/${version}/lineage`);
    const box = el("pre", { class: "lineage" }, JSON.stringify(lineage, null, 2));
    button.closest("td").append(box);
  } catch (e) {
    toast(`lineage refused: ${e.detail || e.message}`, "error");
  }
}

async function auditPage(main) {
  const checkpoint = el("div", { id: "checkpoint" });
  const refreshCheckpoint = async () => {
    const first = await api("GET", "/audit/checkpoints?limit=1");
    const latest = first.total > 0 ? (await api("GET", `/audit/checkpoints?limit=1&offset=${first.total - 1}`)).items[0] : null;
    fill(checkpoint, latest
      ? el("dl", {}, el("dt", {}, "Records"), el("dd", {}, latest.tree_size),
        el("dt", {}, "Merkle root"), el("dd", {}, el("code", {}, latest.root_hash)),
        el("dt", {}, "Signed"), el("dd", {}, when(latest.signed_at)), el("dt", {}, "Key"), el("dd", {}, el("code", {}, latest.key_id)))
      : el("p", { class: "muted" }, "No checkpoint yet (one is signed at every export and verification)."));
  };
  await refreshCheckpoint();
  const result = el("div", { id: "verify-result", class: "verify", hidden: true });
  const verify = el("button", { type: "button", id: "verify", onclick: async () => {
    verify.disabled = true;
    result.hidden = false;
    result.className = "verify";
    result.textContent = "Verifying the stored log...";
    try {
      const out = await api("POST", "/audit/verify");
      result.className = `verify ${out.ok ? "verify-ok" : "verify-bad"}`;
      if (out.ok) refreshCheckpoint();
      fill(result, el("strong", {}, out.ok ? "Verification passed" : "Verification FAILED"), ": ", out.summary,
        out.first_problem ? el("p", {}, `first problem (record ${out.first_bad_seq ?? "?"}): ${out.first_problem}`) : null);
    } catch (e) {
      result.className = "verify verify-bad";
      result.textContent = `verification refused: ${e.detail || e.message}`;
    } finally {
      verify.disabled = false;
    }
  } }, "Verify the stored log now");
  const exportButton = el("button", { type: "button", id: "export", onclick: async () => {
    try {
      const response = await api("POST", "/audit/export", { format: "jsonl" }, { raw: true });
      const url = URL.createObjectURL(await response.blob());
      const link = el("a", { href: url, download: "audit-export.zip" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      toast("export downloaded: verify it offline with fedtune audit verify");
    } catch (e) {
      toast(`export refused: ${e.detail || e.message}`, "error");
    }
  } }, "Export (zip, verifiable offline)");

  const results = el("div", { id: "events" });
  const form = el("form", { id: "search", class: "grid" },
    el("label", {}, "From", el("input", { type: "datetime-local", name: "since" })),
    el("label", {}, "Until", el("input", { type: "datetime-local", name: "until" })),
    el("label", {}, "Actor", el("input", { name: "actor_id", placeholder: "token:3, coordinator..." })),
    el("label", {}, "Action", el("input", { name: "action", placeholder: "job.start, update.rejected..." })),
    el("label", {}, "Outcome", el("select", { name: "outcome" }, ["", "success", "failure", "denied"].map((o) => el("option", { value: o }, o || "any")))),
    el("button", { type: "submit" }, "Search"));
  const search = async (offset = 0) => {
    const params = new URLSearchParams({ limit: "50", offset: String(offset) });
    for (const [key, value] of new FormData(form).entries()) {
      if (!value) continue;
      params.set(key, key === "since" || key === "until" ? new Date(value).toISOString() : value);
    }
    try {
      const page = await api("GET", `/audit/events?${params}`);
      const rows = page.items.map((e) => el("tr", { "data-seq": e.seq },
        el("td", {}, e.seq), el("td", {}, when(e.occurred_at)), el("td", {}, `${e.actor_id}${e.actor_role ? ` (${e.actor_role})` : ""}`),
        el("td", {}, e.action), el("td", {}, `${e.resource_type}${e.resource_id ? ` ${e.resource_id}` : ""}`),
        el("td", {}, badge(e.outcome), e.reason_code ? ` ${e.reason_code}` : ""), el("td", {}, e.origin ?? "-")));
      const pager = el("p", {}, `${page.total} records; showing ${page.offset + 1}-${page.offset + page.items.length} `,
        page.offset > 0 ? el("button", { type: "button", onclick: () => search(Math.max(0, page.offset - 50)) }, "previous") : null,
        page.next_offset !== null ? el("button", { type: "button", onclick: () => search(page.next_offset) }, "next") : null);
      fill(results, pager, table(["Seq", "Time", "Actor", "Action", "Resource", "Outcome", "Origin"], rows));
    } catch (e) {
      fill(results, el("p", { class: "error" }, `search refused: ${e.detail || e.message}`));
    }
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); search(0); });

  fill(main, el("h1", {}, "Audit trail"),
    section("Latest signed checkpoint", checkpoint),
    section("Verification", el("p", {}, "Exports the whole stored trail and checks it as an auditor would offline: the signature, the hash chain, the Merkle root and consistency with the previous checkpoint."),
      can("audit.verify") ? verify : null, result, " ", can("audit.export") ? exportButton : null),
    section("Records", form, results));
  await search(0);
}

// ---- routing --------------------------------------------------------------------------------

async function render() {
  clearTimeout(refreshTimer);
  generation += 1;
  const mine = generation;
  const main = document.getElementById("main");
  const view = document.createElement("div"); // drawn aside, shown only if no newer render started meanwhile
  const path = location.pathname.replace(/\/+$/, "");
  let page = "federation";
  if (path === "/console/jobs") page = "jobs";
  else if (path.startsWith("/console/jobs/")) page = "job";
  else if (path === "/console/audit") page = "audit";
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("current", link.dataset.page === (page === "job" ? "jobs" : page));
  try {
    if (page === "jobs") await jobsPage(view);
    else if (page === "job") await jobPage(view, decodeURIComponent(path.slice("/console/jobs/".length)));
    else if (page === "audit") {
      if (!can("audit.query")) fill(view, el("h1", {}, "Audit trail"), el("p", { class: "error" }, `The ${session.role} role may not read the audit trail (auditors and admins may).`));
      else await auditPage(view);
    } else await federationPage(view);
  } catch (e) {
    fill(view, el("p", { class: "error" }, `Could not load this page: ${e.detail || e.message}`));
  }
  if (mine !== generation) return;
  main.replaceChildren(...view.childNodes);
  document.body.dataset.rendered = String(Date.now());
}

async function signOut() {
  await fetch("/console/sign-out", { method: "POST", headers: { "X-CSRF-Token": session.csrf }, credentials: "same-origin" });
  location.assign("/console/sign-in");
}

async function start() {
  const response = await fetch("/console/session", { credentials: "same-origin" });
  if (!response.ok) {
    location.assign("/console/sign-in");
    return;
  }
  session = await response.json();
  document.getElementById("who").textContent = `${session.actor} (${session.role})`;
  document.body.dataset.role = session.role;
  document.getElementById("sign-out").addEventListener("click", signOut);
  if (!can("audit.query")) document.querySelector('nav a[data-page="audit"]').hidden = true;
  await render();
}

document.addEventListener("DOMContentLoaded", start);
