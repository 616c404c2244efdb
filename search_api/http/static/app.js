// The search page: plain DOM, no framework, no CDN. Talks to the same-origin JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: null, params: null, offset: 0, k: 24 };
// An API key for servers that guard every endpoint: ?key=... once, kept for the session.
const urlKey = new URLSearchParams(location.search).get("key");
if (urlKey) sessionStorage.setItem("apiKey", urlKey);
const apiKey = sessionStorage.getItem("apiKey");

function headers() {
  return apiKey ? { "X-API-Key": apiKey } : {};
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.detail || `${resp.status} ${resp.statusText}`);
  return body;
}

// Thumbnails need the key too when auth is on; fetch them as blobs in that case.
async function setImage(img, url) {
  if (!apiKey) { img.src = url; return; }
  const resp = await fetch(url, { headers: headers() });
  if (resp.ok) img.src = URL.createObjectURL(await resp.blob());
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function fmt(x) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(3);
}

function renderHit(hit) {
  const li = document.createElement("li");
  li.className = "hit";
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
  open.addEventListener("click", () => showDetail(hit));
  const body = document.createElement("div");
  body.className = "body";
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = hit.caption || "";
  const scores = document.createElement("div");
  scores.className = "scores";
  scores.textContent = hit.reranked
    ? `#${hit.rank} score ${fmt(hit.score)} · ITM ${fmt(hit.itm_prob)} · ITC ${fmt(hit.itc_score)}`
    : `#${hit.rank} score ${fmt(hit.score)} · ITC ${fmt(hit.itc_score)}`;
  const path = document.createElement("div");
  path.className = "path";
  path.textContent = hit.path || "";
  const similar = document.createElement("button");
  similar.type = "button";
  similar.className = "similar";
  similar.textContent = "More like this";
  similar.addEventListener("click", () => searchSimilar(hit.image_id));
  body.append(caption, scores, path, similar);
  li.append(open, body);
  return li;
}

function render(data, append) {
  const list = $("results");
  if (!append) list.replaceChildren();
  for (const hit of data.hits) list.append(renderHit(hit));
  const total = list.children.length;
  const ms = data.timings_ms ? Math.round(data.timings_ms.total) : 0;
  setStatus(total ? `${total} results of ${data.indexed_images} images (${ms} ms)` : "No results.");
  $("more").hidden = data.next_offset === null || data.next_offset === undefined;
  state.offset = data.next_offset || 0;
}

async function run(append = false) {
  setStatus("Searching…");
  try {
    let data;
    const offset = append ? state.offset : 0;
    if (state.mode === "text") {
      const params = new URLSearchParams({ ...state.params, k: state.k, offset });
      data = await api(`/api/search?${params}`);
    } else if (state.mode === "similar") {
      const params = new URLSearchParams({ k: state.k, offset, captions: state.params.captions });
      data = await api(`/api/search/similar/${state.params.id}?${params}`);
    } else if (state.mode === "upload") {
      const form = new FormData();
      form.append("file", state.params.file);
      form.append("k", state.k);
      form.append("offset", offset);
      form.append("captions", state.params.captions);
      data = await api("/api/search/image", { method: "POST", body: form });
    }
    render(data, append);
    if (!append) {
      const first = $("results").querySelector(".open");
      if (first && state.mode !== "text") first.focus();
    }
  } catch (err) {
    setStatus(err.message, true);
  }
}

function captionsWanted() {
  return Math.max(0, Math.min(16, Number($("captions").value) || 0));
}

$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("q").value.trim();
  if (!q) { setStatus("Type what you are looking for.", true); return; }
  state.mode = "text";
  state.params = { q, rerank: $("rerank").value || "0", captions: captionsWanted() };
  history.replaceState(null, "", `?q=${encodeURIComponent(q)}`);
  run();
});

$("upload").addEventListener("change", () => {
  const file = $("upload").files[0];
  if (!file) return;
  state.mode = "upload";
  state.params = { file, captions: captionsWanted() };
  run();
});

function searchSimilar(id) {
  if ($("detail").open) $("detail").close();
  state.mode = "similar";
  state.params = { id, captions: captionsWanted() };
  run();
}

$("more").addEventListener("click", () => run(true));

async function showDetail(hit) {
  const dlg = $("detail");
  $("detail-title").textContent = hit.path ? hit.path.split("/").pop() : `Image ${hit.image_id}`;
  $("detail-original").href = hit.original_url;
  $("detail-image").alt = hit.caption || "";
  setImage($("detail-image"), hit.thumbnail_url);
  $("detail-caption").textContent = hit.caption || "";
  const meta = $("detail-meta");
  meta.replaceChildren();
  dlg.dataset.imageId = hit.image_id;
  dlg.showModal();
  $("detail-similar").focus();
  try {
    const d = await api(`/api/images/${hit.image_id}`);
    const rows = [
      ["Size", d.width && d.height ? `${d.width} × ${d.height}` : "–"],
      ["Captured", d.captured_at || "–"],
      ["Camera", [d.camera_make, d.camera_model].filter(Boolean).join(" ") || "–"],
      ["Files", d.files.map((f) => f.path).join("\n")],
      ["Scores", `score ${fmt(hit.score)}, ITM ${fmt(hit.itm_prob)}, ITC ${fmt(hit.itc_score)}`],
    ];
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      meta.append(dt, dd);
    }
    if (!hit.caption && d.caption) $("detail-caption").textContent = d.caption;
  } catch (err) {
    $("detail-caption").textContent = err.message;
  }
}

$("detail-similar").addEventListener("click", () => searchSimilar(Number($("detail").dataset.imageId)));

// Keyboard: "/" focuses the search box (unless typing somewhere); Escape closes the dialog (native).
document.addEventListener("keydown", (ev) => {
  if (ev.key === "/" && document.activeElement.tagName !== "INPUT") {
    ev.preventDefault();
    $("q").focus();
  }
});

// A shared link (?q=...) runs its search on load.
const initial = new URLSearchParams(location.search).get("q");
if (initial) {
  $("q").value = initial;
  $("search-form").requestSubmit();
}
