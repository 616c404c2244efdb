// The search page: plain DOM, no framework, no CDN. Talks to the same-origin JSON API.
// Every limit and default comes from GET /api/config; the search itself lives in the URL.
"use strict";

const $ = (id) => document.getElementById(id);
let config = null;   // GET /api/config
let library = null;  // GET /api/library
// The search as the URL holds it: mode "" (none), "text", "similar" or "image".
let st = {};
// What is on screen: loaded hits in ranking order, the next page's offset, and a token that
// invalidates answers of a search that was replaced meanwhile.
let hits = [];
let nextOffset = null;
let loading = 0;  // the token of the search whose page is being fetched, 0 when none
let token = 0;
let queryImage = null;  // the Blob of an image search
let lastTotalMs = 0;

class KeyNeeded extends Error {}

// ------------------------------------------------------------------ API access
// An API key for servers that guard every endpoint: asked once (or ?key=...), kept for the session.
const urlKey = new URLSearchParams(location.search).get("key");
if (urlKey) sessionStorage.setItem("apiKey", urlKey);
const apiKey = () => sessionStorage.getItem("apiKey");

function headers() {
  const key = apiKey();
  return key && config ? { [config.key_header]: key } : {};
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await resp.json().catch(() => ({}));
  if (resp.status === 401) { askForKey(apiKey() ? "That key was not accepted." : ""); throw new KeyNeeded(); }
  if (!resp.ok) throw new Error(body.detail || `${resp.status} ${resp.statusText}`);
  return body;
}

// Images need the key too when auth is on; fetch them as blobs in that case.
async function setImage(img, url) {
  if (!apiKey()) { img.src = url; return; }
  const resp = await fetch(url, { headers: headers() });
  if (resp.ok) img.src = URL.createObjectURL(await resp.blob());
}

function askForKey(message) {
  $("key-error").textContent = message;
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("apiKey", $("key-input").value.trim());
  $("key-dialog").close();
  start();
});

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function fail(err) {
  if (!(err instanceof KeyNeeded)) setStatus(err.message, true);
}

// ------------------------------------------------------------------ the URL
const DEFAULTS = { mode: "", q: "", id: "", folder: "", from: "", to: "", camera: "", sort: "relevance",
  rerank: "", captions: "", page: "1", weak: "", group: "" };

function readUrl() {
  const p = new URLSearchParams(location.search);
  st = {};
  for (const [name, value] of Object.entries(DEFAULTS)) st[name] = p.get(name) ?? value;
  if (!st.mode && st.q) st.mode = "text";
  if (st.rerank === "") st.rerank = String(config.default_rerank);
  if (st.captions === "") st.captions = String(Math.min(4, config.max_caption_hits));
  $("q").value = st.mode === "text" ? st.q : "";
  for (const name of ["folder", "from", "to", "camera", "sort", "rerank", "captions"]) $(name).value = st[name];
  $("group").checked = st.group === "1";
}

function writeUrl(push) {
  const p = new URLSearchParams();
  for (const [name, value] of Object.entries(st)) {
    if (value !== DEFAULTS[name] && !(name === "rerank" && value === String(config.default_rerank))
        && !(name === "captions" && value === String(Math.min(4, config.max_caption_hits)))) p.set(name, value);
  }
  const url = p.toString() ? `?${p}` : location.pathname;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}

function readForm() {
  for (const name of ["folder", "from", "to", "camera", "sort"]) st[name] = $(name).value;
  st.rerank = String(clamp($("rerank").value, 0, config.max_rerank_depth));
  st.captions = String(clamp($("captions").value, 0, config.max_caption_hits));
  st.group = $("group").checked ? "1" : "";
}

function clamp(v, lo, hi) {
  return Math.max(lo, Math.min(hi, Math.trunc(Number(v)) || 0));
}

window.addEventListener("popstate", () => { readUrl(); runSearch(); });

// ------------------------------------------------------------------ searching
function filterParams() {
  const p = {};
  if (st.folder) p.path_prefix = st.folder + "/";
  if (st.from) p.captured_after = `${st.from}T00:00:00`;
  if (st.to) p.captured_before = `${st.to}T23:59:59`;
  if (st.camera) p.camera = st.camera;
  if (st.sort !== "relevance") p.sort = st.sort;
  return p;
}

async function fetchPage(offset) {
  const k = config.page_size;
  if (st.mode === "text") {
    const p = new URLSearchParams({ q: st.q, k, offset, rerank: st.rerank, captions: st.captions, ...filterParams() });
    return api(`/api/search?${p}`);
  }
  if (st.mode === "similar") {
    const p = new URLSearchParams({ k, offset, captions: st.captions, ...filterParams() });
    return api(`/api/search/similar/${encodeURIComponent(st.id)}?${p}`);
  }
  const form = new FormData();
  form.append("file", queryImage, "query");
  for (const [name, value] of Object.entries({ k, offset, captions: st.captions, ...filterParams() })) form.append(name, value);
  return api("/api/search/image", { method: "POST", body: form });
}

// A new search (or the URL's search after reload/Back): clears the grid, loads `page` pages.
async function runSearch() {
  token += 1;
  hits = [];
  nextOffset = 0;
  $("results").replaceChildren();
  $("results").classList.toggle("show-weak", st.weak === "1");
  updateWeaker();
  showChip();
  if (!st.mode) { setStatus(""); return; }
  if (st.mode === "image" && !queryImage) queryImage = restoreImage();
  if (st.mode === "image" && !queryImage) { setStatus("Choose or drop the query image again.", true); return; }
  const pages = clamp(st.page, 1, 50);
  st.page = "0";
  for (let n = 0; n < pages && nextOffset !== null; n++) {
    if (!(await loadPage())) return;
  }
  fillViewport();
}

async function loadPage() {
  const mine = token;
  if (loading === mine || nextOffset === null) return false;
  loading = mine;
  document.body.dataset.loading = "1";  // for tests and styles: a page is on its way
  if (!hits.length) setStatus("Searching…");
  try {
    const data = await fetchPage(nextOffset);
    if (mine !== token) return false;
    const first = hits.length;
    hits.push(...data.hits);
    nextOffset = data.next_offset ?? null;
    lastTotalMs = data.timings_ms ? Math.round(data.timings_ms.total) : 0;
    for (const hit of data.hits) $("results").append(renderHit(hit));
    st.page = String(Number(st.page) + 1);
    writeUrl(false);
    showSummary(data.indexed_images);
    if (st.group === "1") await groupDuplicates(mine);
    return first < hits.length || nextOffset === null;
  } catch (err) {
    if (mine === token) fail(err);
    return false;
  } finally {
    if (loading === mine) { loading = 0; delete document.body.dataset.loading; }
  }
}

// Infinite scroll: the sentinel below the grid loads the next page when it comes near the viewport.
// With weaker matches hidden, pages of weaker matches only would load without end: stop at the first.
function mayLoadMore() {
  if (nextOffset === null || loading === token || !st.mode) return false;
  if (!showingWeak() && hits.length) {
    const lastPage = hits.slice(-config.page_size);
    if (lastPage.every((h) => isWeak(h))) return false;
  }
  return true;
}

function sentinelNear() {
  return $("sentinel").getBoundingClientRect().top < window.innerHeight + 400;
}

async function fillViewport() {
  const mine = token;
  while (mine === token && mayLoadMore() && sentinelNear()) {
    if (!(await loadPage())) break;
  }
}

new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) fillViewport();
}, { rootMargin: "400px" }).observe($("sentinel"));

function startSearch(mode, fields) {
  readForm();
  Object.assign(st, { mode, q: "", id: "", page: "1", weak: "" }, fields);
  writeUrl(true);
  runSearch();
}

$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("q").value.trim();
  if (!q) { setStatus("Type what you are looking for.", true); return; }
  if (q.length > config.max_query_chars) { setStatus(`At most ${config.max_query_chars} characters.`, true); return; }
  startSearch("text", { q });
});

// A changed filter re-runs the current search (as a new history entry, so Back undoes it).
$("filters").addEventListener("change", () => {
  if (!st.mode) { readForm(); writeUrl(false); return; }
  startSearch(st.mode, { q: st.q, id: st.id });
});
$("filters").addEventListener("submit", (ev) => ev.preventDefault());

function searchSimilar(id) {
  if ($("detail").open) $("detail").close();
  queryImage = null;
  startSearch("similar", { id: String(id) });
}

function searchImage(file) {
  if (!file || !file.type.startsWith("image/")) { setStatus("That is not an image.", true); return; }
  if (file.size > config.max_upload_bytes) {
    setStatus(`The image is larger than the server takes (${Math.round(config.max_upload_bytes / 1e6)} MB).`, true);
    return;
  }
  queryImage = file;
  keepImage(file);
  startSearch("image", {});
}

// The query image survives a reload (session storage, when small enough); the URL says mode=image.
function keepImage(file) {
  sessionStorage.removeItem("queryImage");
  if (file.size > 3_000_000) return;
  const reader = new FileReader();
  reader.onload = () => { try { sessionStorage.setItem("queryImage", reader.result); } catch { /* full */ } };
  reader.readAsDataURL(file);
}

function restoreImage() {
  const url = sessionStorage.getItem("queryImage");
  if (!url) return null;
  const [head, data] = url.split(",");
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: head.slice(5).split(";")[0] });
}

$("upload").addEventListener("change", () => {
  const file = $("upload").files[0];
  $("upload").value = "";
  if (file) searchImage(file);
});

// Drag-and-drop and paste of an image search with it.
document.addEventListener("dragover", (ev) => {
  if ([...ev.dataTransfer.items].some((i) => i.kind === "file")) {
    ev.preventDefault();
    $("drop-hint").hidden = false;
  }
});
document.addEventListener("dragleave", (ev) => { if (!ev.relatedTarget) $("drop-hint").hidden = true; });
document.addEventListener("drop", (ev) => {
  ev.preventDefault();
  $("drop-hint").hidden = true;
  const file = [...ev.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  if (file) searchImage(file); else setStatus("Drop an image file to search with it.", true);
});
document.addEventListener("paste", (ev) => {
  const file = [...(ev.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) { ev.preventDefault(); searchImage(file); }
});

function showChip() {
  const chip = $("query-chip");
  chip.hidden = st.mode !== "similar" && st.mode !== "image";
  $("q").hidden = !chip.hidden;
  if (chip.hidden) return;
  const img = $("chip-image");
  if (st.mode === "similar") {
    $("chip-label").textContent = "Like this photo";
    setImage(img, `/api/images/${encodeURIComponent(st.id)}/thumbnail`);
  } else if (queryImage || restoreImage()) {
    $("chip-label").textContent = "Like this image";
    img.src = URL.createObjectURL(queryImage || restoreImage());
  }
}

$("chip-clear").addEventListener("click", () => {
  queryImage = null;
  sessionStorage.removeItem("queryImage");
  startSearch("", {});
  $("q").focus();
});

// ------------------------------------------------------------------ results
function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// One understandable score per hit: the ITM head's match probability for re-ranked text hits, the
// similarity otherwise. A hit is weaker when it is below the server's cut-off, or when re-ranking was
// asked for and the hit lies past its depth (the ITM head did not check it).
function scoreLabel(hit) {
  if (st.mode === "text" && hit.reranked) return `${Math.round(hit.itm_prob * 100)}% match`;
  return `similarity ${fmt(hit.score, 2)}`;
}

function isWeak(hit) {
  if (st.mode === "text") {
    if (hit.reranked) return hit.itm_prob < config.weak_match_prob;
    return Number(st.rerank) > 0;
  }
  return hit.score < config.weak_similarity;
}

function rawScores(hit) {
  if (st.mode !== "text") return `similarity ${fmt(hit.score)} (image to image)`;
  const parts = [`score ${fmt(hit.score)}${hit.reranked ? " = ITM logit + ITC" : " = ITC"}`];
  if (hit.reranked) parts.push(`ITM P(match) ${fmt(hit.itm_prob)}`, `ITM logit ${fmt(hit.itm_logit)}`);
  parts.push(`ITC ${fmt(hit.itc_score)}`, `rank ${hit.rank}`);
  return parts.join(" · ");
}

function renderHit(hit) {
  const li = document.createElement("li");
  li.className = "hit";
  li.classList.toggle("weak", isWeak(hit));
  li.dataset.imageId = hit.image_id;
  li.dataset.captioned = hit.caption !== null && hit.caption !== undefined;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.setAttribute("aria-label", `Open image ${hit.rank}: ${hit.path || hit.image_id}`);
  const img = document.createElement("img");
  img.alt = hit.caption || `result ${hit.rank}`;
  img.loading = "lazy";
  setImage(img, hit.thumbnail_url);
  open.append(img);
  open.addEventListener("click", () => showDetail(hit.image_id));
  const body = document.createElement("div");
  body.className = "body";
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = hit.caption || "";
  const scores = document.createElement("div");
  scores.className = "scores";
  scores.textContent = scoreLabel(hit);
  scores.title = rawScores(hit);
  const path = document.createElement("div");
  path.className = "path";
  path.textContent = [hit.path ? hit.path.split("/").slice(-2).join("/") : "", hit.captured_at ? hit.captured_at.slice(0, 10) : ""]
    .filter(Boolean).join(" · ");
  path.title = hit.path || "";
  const similar = document.createElement("button");
  similar.type = "button";
  similar.className = "similar";
  similar.textContent = "More like this";
  similar.addEventListener("click", () => searchSimilar(hit.image_id));
  body.append(caption, scores, path, similar);
  li.append(open, body);
  return li;
}

// With no hit above the cut-off, the nearest ones are shown anyway (said so), never an empty page.
function showingWeak() {
  return st.weak === "1" || (hits.length > 0 && !hits.some((h) => !isWeak(h)));
}

function showSummary(indexed) {
  const weak = hits.filter(isWeak).length;
  const more = nextOffset !== null ? "+" : "";
  $("results").classList.toggle("show-weak", showingWeak());
  let text;
  if (!hits.length) text = "No results.";
  else if (weak === hits.length) text = `No close matches: the ${hits.length}${more} nearest`;
  else if (st.weak === "1") text = `${hits.length - weak} matches and ${weak} weaker`;
  else text = `${hits.length - weak} matches` + (weak ? ` (${weak}${more} weaker hidden)` : "");
  setStatus(`${text} · ${indexed} images indexed · ${lastTotalMs} ms`);
  updateWeaker();
}

function updateWeaker() {
  const weak = hits.filter(isWeak).length;
  const btn = $("weaker");
  btn.hidden = weak === 0 || weak === hits.length;
  const more = nextOffset !== null ? "+" : "";
  btn.textContent = st.weak === "1" ? "Hide weaker matches" : `Show ${weak}${more} weaker matches`;
}

$("weaker").addEventListener("click", () => {
  st.weak = st.weak === "1" ? "" : "1";
  writeUrl(false);
  showSummary(library ? library.indexed_images : 0);
  fillViewport();
});

// Near-duplicates: the server groups the loaded hits by image-to-image similarity; each group shows
// as its best-ranked card with a count (the others fold into it; their scores are untouched).
async function groupDuplicates(mine) {
  const ids = hits.slice(0, config.max_duplicate_ids).map((h) => h.image_id);
  const data = await api("/api/duplicates", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image_ids: ids }),
  });
  if (mine !== token) return;
  const cards = new Map([...$("results").children].map((li) => [Number(li.dataset.imageId), li]));
  for (const li of cards.values()) {
    li.classList.remove("dup", "dup-open");
    li.querySelector(".dupes")?.remove();
    delete li.dataset.groupSize;
  }
  for (const group of data.groups) {
    const leader = cards.get(group[0]);
    const members = group.slice(1).map((id) => cards.get(id)).filter(Boolean);
    if (!leader || !members.length) continue;
    for (const m of members) m.classList.add("dup");
    leader.dataset.groupSize = String(group.length);
    const badge = document.createElement("button");
    badge.type = "button";
    badge.className = "dupes";
    badge.textContent = `+${members.length} similar`;
    badge.setAttribute("aria-expanded", "false");
    badge.addEventListener("click", () => {
      const open = badge.getAttribute("aria-expanded") !== "true";
      badge.setAttribute("aria-expanded", String(open));
      for (const m of members) m.classList.toggle("dup-open", open);
    });
    leader.querySelector(".body").append(badge);
  }
}

// ------------------------------------------------------------------ the viewer
function visibleIds() {
  return [...$("results").children].filter((li) => li.offsetParent !== null).map((li) => Number(li.dataset.imageId));
}

let viewerToken = 0;

async function showDetail(imageId) {
  const hit = hits.find((h) => h.image_id === imageId);
  if (!hit) return;
  const mine = ++viewerToken;
  const dlg = $("detail");
  dlg.dataset.imageId = imageId;
  $("detail-title").textContent = hit.path ? hit.path.split("/").pop() : `Image ${imageId}`;
  $("detail-original").href = hit.original_url;
  $("detail-original").download = hit.path ? hit.path.split("/").pop() : "";
  $("detail-image").alt = hit.caption || "";
  $("detail-image").removeAttribute("src");
  setImage($("detail-image"), `/api/images/${imageId}/display`);
  $("detail-caption").textContent = hit.caption || "";
  $("ask-answer").textContent = "";
  $("ask-form").hidden = !config.caption_model;
  const ids = visibleIds();
  $("detail-prev").disabled = ids.indexOf(imageId) <= 0;
  $("detail-next").disabled = ids.indexOf(imageId) >= ids.length - 1;
  $("detail-meta").replaceChildren();
  if (!dlg.open) { dlg.showModal(); $("detail-similar").focus(); }
  try {
    const d = await api(`/api/images/${imageId}`);
    if (mine !== viewerToken) return;
    const rows = [
      ["Score", `${scoreLabel(hit)}\n${rawScores(hit)}`],
      ["Size", d.width && d.height ? `${d.width} × ${d.height}` : "–"],
      ["Captured", d.captured_at ? d.captured_at.replace("T", " ") : "–"],
      ["Camera", [d.camera_make, d.camera_model].filter(Boolean).join(" ") || "–"],
      ["Files", d.files.map((f) => f.path).join("\n")],
    ];
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      $("detail-meta").append(dt, dd);
    }
    const caption = hit.caption || d.caption;
    if (caption) { $("detail-caption").textContent = caption; return; }
    if (!config.caption_model) return;
    // No caption yet: made on demand (and cached by the server).
    $("detail-caption").textContent = "Captioning…";
    const c = await api("/api/caption", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image_id: imageId }),
    });
    if (mine !== viewerToken) return;
    hit.caption = c.text;
    $("detail-caption").textContent = c.text || "(the model gave an empty caption)";
  } catch (err) {
    if (mine === viewerToken && !(err instanceof KeyNeeded)) $("detail-caption").textContent = err.message;
  }
}

function step(delta) {
  const ids = visibleIds();
  const at = ids.indexOf(Number($("detail").dataset.imageId));
  const next = ids[at + delta];
  if (next !== undefined) showDetail(next);
  if (delta > 0 && at + delta >= ids.length - 2) fillViewport();
}

$("detail-prev").addEventListener("click", () => step(-1));
$("detail-next").addEventListener("click", () => step(1));
$("detail-similar").addEventListener("click", () => searchSimilar(Number($("detail").dataset.imageId)));

// "Ask about this photo": the question in BLIP-2's prompt format, answered by the caption model.
$("ask-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const q = $("ask-q").value.trim();
  if (!q) return;
  const imageId = Number($("detail").dataset.imageId);
  const mine = viewerToken;
  $("ask-answer").textContent = "Thinking…";
  try {
    const prompt = config.ask_prompt.replace("{question}", q);
    const c = await api("/api/caption", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image_id: imageId, prompt }),
    });
    if (mine === viewerToken) $("ask-answer").textContent = c.text.trim() || "(no answer)";
  } catch (err) {
    if (mine === viewerToken && !(err instanceof KeyNeeded)) $("ask-answer").textContent = err.message;
  }
});

// With a key, the original is fetched as a blob (a plain link cannot send the header).
$("detail-original").addEventListener("click", async (ev) => {
  if (!apiKey()) return;
  ev.preventDefault();
  const resp = await fetch(ev.currentTarget.href, { headers: headers() });
  if (!resp.ok) return;
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await resp.blob());
  a.download = $("detail-original").download;
  a.click();
});

// Keyboard: "/" focuses the search box (unless typing somewhere); in the viewer left/right step and
// Escape closes (native to the dialog).
document.addEventListener("keydown", (ev) => {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
  if ($("detail").open) {
    if (typing) return;
    if (ev.key === "ArrowLeft") { ev.preventDefault(); step(-1); }
    if (ev.key === "ArrowRight") { ev.preventDefault(); step(1); }
    return;
  }
  if (ev.key === "/" && !typing) {
    ev.preventDefault();
    $("q").focus();
  }
});

// ------------------------------------------------------------------ start
async function start() {
  try {
    const resp = await fetch("/api/config");
    if (!resp.ok) throw new Error(`the server is not ready (${resp.status})`);
    config = await resp.json();
    if (config.requires_key && !apiKey()) { askForKey(""); return; }
    $("rerank").max = config.max_rerank_depth;
    $("captions").max = config.max_caption_hits;
    $("q").maxLength = config.max_query_chars;
    library = await api("/api/library");
    fillFilters();
    $("empty").hidden = library.indexed_images > 0;
    $("empty-command").textContent = library.index_command;
    readUrl();
    if (library.indexed_images === 0) { setStatus(""); return; }
    await runSearch();
  } catch (err) {
    fail(err);
  }
}

function fillFilters() {
  const options = (select, items) => {
    const keep = select.firstElementChild;
    select.replaceChildren(keep, ...items.map(([value, label]) => new Option(label, value)));
  };
  options($("folder"), library.folders.map((f) => [f, f]));
  options($("camera"), library.cameras.map((c) => [c.name, `${c.name} (${c.images})`]));
  $("camera").closest("label").hidden = library.cameras.length === 0;
  for (const id of ["from", "to"]) {
    if (library.captured_min) $(id).min = library.captured_min.slice(0, 10);
    if (library.captured_max) $(id).max = library.captured_max.slice(0, 10);
  }
}

start();
