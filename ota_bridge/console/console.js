// The ota-bridge web console: hand-written, no build step, nothing loaded from elsewhere.
// Reads and writes through the REST API with the token kept in session storage; live changes come
// from GET /v1/events (server-sent events, opened with a one-use ticket), and the page re-reads
// what it shows when an event concerns it.

const TOKEN_KEY = "ota-bridge-token";
const FINAL = ["SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "INTERRUPTED", "REJECTED"];
const $ = (id) => document.getElementById(id);
let events = null;
let refreshTimer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

class SignedOut extends Error {}

function fail(err) {
  if (!(err instanceof SignedOut)) say(err.message, true);
}

function say(text, error = false) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await resp.json().catch(() => null);
  if (resp.status === 401) {
    signOut(`The token was refused (${data && data.Detail ? data.Detail : "401"}): sign in again.`);
    throw new SignedOut();
  }
  if (!resp.ok) throw new Error(data && data.Detail ? `${data.Error}: ${data.Detail}` : `HTTP ${resp.status}`);
  return data;
}

// --- sign in and the live stream -------------------------------------------------------------

function signOut(why = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  if (events) events.close();
  events = null;
  show();
  say(why, Boolean(why));
}

async function connect() {
  if (events) events.close();
  if (!sessionStorage.getItem(TOKEN_KEY)) return;  // signed out meanwhile
  try {
    const { Ticket } = await api("POST", "/v1/events/ticket");
    events = new EventSource(`/v1/events?Ticket=${encodeURIComponent(Ticket)}`);
  } catch (e) {
    $("live").textContent = "Live updates: off";
    setTimeout(connect, 3000);
    return;
  }
  events.addEventListener("ready", () => { $("live").textContent = "Live updates: on"; refresh(); });
  events.addEventListener("resync", () => refresh());
  for (const kind of ["job", "child", "device"]) {
    events.addEventListener(kind, (e) => onEvent(kind, JSON.parse(e.data)));
  }
  events.onerror = () => {  // a ticket is good once: ask for a new one rather than let EventSource retry
    $("live").textContent = "Live updates: reconnecting";
    events.close();
    events = null;
    if (sessionStorage.getItem(TOKEN_KEY)) setTimeout(connect, 2000);
  };
}

function onEvent(kind, data) {
  const [page, id] = route();
  const concerns = {
    devices: kind !== "job",
    jobs: true,
    job: kind === "child" && data.ParentJobId === id,
    device: kind === "child" && data.DeviceId === id,
    new: false,
  }[page];
  if (concerns) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, 150);
  }
}

// --- pages -------------------------------------------------------------------------------------

function route() {
  const [page, ...rest] = (location.hash.slice(1) || "devices").split("/");
  return [page, decodeURIComponent(rest.join("/"))];
}

const PAGES = { devices: devicesPage, jobs: jobsPage, job: jobPage, device: queuePage, new: formsPage };

async function show() {
  const signedIn = Boolean(sessionStorage.getItem(TOKEN_KEY));
  $("sign-in").hidden = signedIn;
  $("page").hidden = !signedIn;
  $("nav").hidden = !signedIn;
  if (!signedIn) { $("token").focus(); return; }
  const [page] = route();
  for (const a of document.querySelectorAll("nav a")) {
    a.toggleAttribute("aria-current", a.getAttribute("href") === `#${page}`);
    if (a.hasAttribute("aria-current")) a.setAttribute("aria-current", "page");
  }
  $("page").replaceChildren();
  await render();
}

async function render() {
  const [page, id] = route();
  try {
    await (PAGES[page] || devicesPage)(id);
  } catch (e) {
    fail(e);
  }
}

async function refresh() {
  if (!sessionStorage.getItem(TOKEN_KEY) || route()[0] === "new") return;
  await render();
}

function place(...nodes) {
  $("page").replaceChildren(...nodes);
}

function field(id, text, input) {
  input.id = id;
  return el("div", { class: "field" }, el("label", { for: id, text }), input);
}

function table(caption, heads, rows, empty) {
  if (!rows.length) return el("p", { class: "empty", text: empty });
  return el("table", {}, el("caption", { class: "visually-hidden", text: caption }),
    el("thead", {}, el("tr", {}, heads.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows));
}

function when(time) {
  return time ? new Date(time).toLocaleString() : "never";
}

function statusCell(status) {
  return el("td", { class: `status ${status}`, text: status });
}

function childStatus(child) {  // a device fetching its artifacts: how far it is
  const cell = statusCell(child.Status);
  const d = child.Download;
  if (child.Status !== "DOWNLOADING" || !d) return cell;
  const share = d.TotalBytes ? Math.floor((100 * d.Bytes) / d.TotalBytes) : 0;
  const bar = el("progress", { max: d.TotalBytes || 1, value: d.Bytes, "aria-label": `Download of ${child.DeviceId}` });
  cell.append(" ", bar, ` ${mebibytes(d.Bytes)} of ${mebibytes(d.TotalBytes)} MiB (${share}%)`);
  return cell;
}

function mebibytes(bytes) {
  return (bytes / 1048576).toFixed(1);
}

async function devicesPage() {
  let filter = $("device-filter");
  if (!filter) {  // built once per visit, so a live refresh leaves what is typed, and the focus, alone
    filter = filterForm();
    place(el("h2", { text: "Devices" }), filter, el("div", { id: "results" }));
  }
  const group = filter.elements.group.value.trim();
  const tag = filter.elements.tag.value.trim();
  const query = new URLSearchParams();
  if (group) query.set("DeviceGroup", group);
  if (tag) query.set("TagId", tag);
  const devices = await api("GET", `/v1/device${query.size ? "?" + query : ""}`);
  const rows = devices.map((d) => el("tr", { "data-device": d.DeviceId },
    el("td", {}, el("a", { href: `#device/${encodeURIComponent(d.DeviceId)}`, text: d.DeviceId })),
    el("td", { class: d.Online ? "online" : "offline", text: d.Online ? "online" : "offline" }),
    el("td", { text: d.DeviceGroup || "" }),
    el("td", { text: d.Tags.join(", ") }),
    el("td", { text: when(d.LastSeen) }),
    el("td", { text: d.PendingJobs })));
  $("results").replaceChildren(
    table("Devices", ["Device", "Presence", "Group", "Tags", "Last seen", "Queue"], rows, "No devices match."));
}

function filterForm() {
  const form = el("form", { id: "device-filter", class: "inline", "aria-label": "Filter devices" },
    field("filter-group", "Group", el("input", { name: "group", type: "text" })),
    field("filter-tag", "Tag", el("input", { name: "tag", type: "text" })),
    el("button", { type: "submit", text: "Filter" }));
  form.addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
  return form;
}

function progress(job) {
  const counts = typeof job.Result === "object" ? job.Result : null;
  const total = counts ? counts.Total : 1;
  const done = counts ? FINAL.reduce((n, s) => n + counts[s], 0) : (FINAL.includes(job.Status) ? 1 : 0);
  const succeeded = counts ? counts.SUCCEEDED : Number(job.Status === "SUCCEEDED");
  const downloading = counts && counts.DOWNLOADING ? `, ${counts.DOWNLOADING} downloading` : "";
  return el("td", {}, el("progress", { max: total || 1, value: done, "aria-label": `Progress of ${job.JobName}` }),
    " ", `${done} of ${total} done, ${succeeded} succeeded${downloading}`);
}

function target(job) {
  if (job.DeviceId) return `device ${job.DeviceId}`;
  return job.DeviceGroup ? `group ${job.DeviceGroup}` : `tag ${job.TagId}`;
}

async function jobsPage() {
  const jobs = await api("GET", "/v1/job?Limit=50");
  const rows = jobs.map((j) => el("tr", { "data-job": j.JobId },
    el("td", {}, el("a", { href: `#job/${j.JobId}`, text: j.JobName })),
    el("td", { text: target(j) }), statusCell(j.Status), progress(j), el("td", { text: when(j.CreatedTime) })));
  place(el("h2", { text: "Jobs (newest 50)" }),
    table("Jobs", ["Job", "Target", "Status", "Progress", "Submitted"], rows, "No jobs yet."));
}

async function jobPage(id) {
  const [job, children] = await Promise.all([api("GET", `/v1/job/${id}`), api("GET", `/v1/job/${id}/childjobs`)]);
  const rows = children.map((c) => el("tr", { "data-child": c.DeviceId },
    el("td", {}, el("a", { href: `#device/${encodeURIComponent(c.DeviceId)}`, text: c.DeviceId })),
    childStatus(c), el("td", { text: c.ExitCode ?? "" }),
    el("td", {}, el("pre", { class: "stdout", text: c.Stdout })),
    el("td", {}, el("pre", { class: "stderr", text: c.Stderr || c.Reason || "" }))));
  place(el("h2", { text: `Job ${job.JobName}` }),
    el("p", {}, `${target(job)} · `, el("code", { text: job.Command }), ` · `,
      el("span", { class: `status ${job.Status}`, text: job.Status })),
    el("p", { class: "progress" }, [...progress(job).childNodes]),
    el("h3", { text: "Devices" }),
    table("Child jobs", ["Device", "Status", "Exit code", "Stdout", "Stderr"], rows, "No child jobs."));
}

async function queuePage(id) {
  const [device, queue] = await Promise.all([api("GET", `/v1/device/${encodeURIComponent(id)}`),
    api("GET", `/v1/device/${encodeURIComponent(id)}/queue`)]);
  const items = queue.Jobs.map((j) => el("li", {},
    el("a", { href: `#job/${j.ParentJobId}`, text: j.JobName }), " ", el("code", { text: j.Command }), " ",
    el("span", { class: `status ${j.Status}`, text: j.Status })));
  place(el("h2", { text: `Device ${id}` }),
    el("p", {}, el("span", { class: device.Online ? "online" : "offline", text: device.Online ? "online" : "offline" }),
      ` · group ${device.DeviceGroup || "none"} · tags ${device.Tags.join(", ") || "none"} · last seen `,
      when(device.LastSeen)),
    el("h3", { text: `Queue (${queue.Total} pending, in the order the device runs them)` }),
    items.length ? el("ol", { class: "queue" }, items) : el("p", { class: "empty", text: "Nothing queued." }));
}

async function formsPage() {
  const workflows = await api("GET", "/v1/workflow");
  const wfForm = el("form", { id: "workflow-form", "aria-labelledby": "workflow-title" },
    el("h2", { id: "workflow-title", text: "Define a workflow" }),
    field("wf-name", "Name", el("input", { name: "Name", required: true, maxlength: 200 })),
    field("wf-command", "Command", el("input", { name: "Command", required: true })),
    field("wf-timeout", "Timeout (seconds, optional)", el("input", { name: "TimeoutSeconds", type: "number", min: 1 })),
    el("button", { type: "submit", text: "Define workflow" }));
  const jobForm = el("form", { id: "job-form", "aria-labelledby": "job-title" },
    el("h2", { id: "job-title", text: "Submit a job" }),
    field("job-workflow", "Workflow", el("select", { name: "WorkflowId", required: true },
      workflows.map((w) => el("option", { value: w.WorkflowId, text: `${w.Name}: ${w.Command}` })))),
    field("job-target-kind", "Target", el("select", { name: "kind" },
      el("option", { value: "DeviceId", text: "a device" }), el("option", { value: "DeviceGroup", text: "a group" }),
      el("option", { value: "TagId", text: "a tag" }))),
    field("job-target", "Device id, group or tag", el("input", { name: "target", required: true })),
    field("job-name", "Job name (optional)", el("input", { name: "Name", maxlength: 200 })),
    el("button", { type: "submit", text: "Submit job" }));
  wfForm.addEventListener("submit", (e) => submitWorkflow(e, wfForm));
  jobForm.addEventListener("submit", (e) => submitJob(e, jobForm));
  place(el("div", { class: "forms" }, wfForm, jobForm));
}

async function submitWorkflow(e, form) {
  e.preventDefault();
  const f = form.elements;
  const body = { Name: f.Name.value, Command: f.Command.value };
  if (f.TimeoutSeconds.value) body.TimeoutSeconds = Number(f.TimeoutSeconds.value);
  try {
    const { WorkflowId } = await api("POST", "/v1/workflow", body);
    say(`Workflow ${body.Name} defined.`);
    await render();
    $("job-workflow").value = WorkflowId;
    $("job-workflow").focus();
  } catch (err) { fail(err); }
}

async function submitJob(e, form) {
  e.preventDefault();
  const f = form.elements;
  const body = { WorkflowId: f.WorkflowId.value, [f.kind.value]: f.target.value.trim() };
  if (f.Name.value) body.Name = f.Name.value;
  try {
    const { JobId } = await api("POST", "/v1/job", body);
    say("Job submitted.");
    location.hash = `#job/${JobId}`;
  } catch (err) { fail(err); }
}

// --- start -------------------------------------------------------------------------------------

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  say("");
  show();
  connect();
});
$("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", () => { say(""); show(); });
show();
if (sessionStorage.getItem(TOKEN_KEY)) connect();
