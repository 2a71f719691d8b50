// clipsearch web page: search by text, by an indexed image ("more like this") or by a dropped / pasted image, plus
// chips and filters (query.js). The query lives in the URL (?q=... or ?like=ID, &add=..&after=..), so a search can
// be shared or reloaded. Every search is one POST /api/query. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = Math.min(200, Math.max(1, Number(new URLSearchParams(location.search).get("k")) || 48));

const state = {
  query: null,      // {kind: "text", text} | {kind: "like", id} | {kind: "upload", blob, name, data (base64)}
  results: [],
  hasMore: false,
  loading: false,
  token: 0,         // bumped per new search, so a late answer to an old one is dropped
  viewing: -1,      // index into results shown in the viewer
};

// --- URL <-> query ------------------------------------------------------------------------------------------

function queryFromUrl() {
  const params = new URLSearchParams(location.search);
  if (params.get("q")) return { kind: "text", text: params.get("q") };
  if (/^\d+$/.test(params.get("like") || "")) return { kind: "like", id: Number(params.get("like")) };
  return null;
}

function urlFor(query) {
  const params = new URLSearchParams();
  if (query && query.kind === "text") params.set("q", query.text);
  if (query && query.kind === "like") params.set("like", String(query.id));
  const current = new URLSearchParams(location.search);
  if (current.get("k")) params.set("k", current.get("k"));
  QueryModel.writeUrl(params);
  const text = params.toString();
  return text ? `/?${text}` : "/";
}

function mainTerm(query) {
  if (!query) return null;
  if (query.kind === "text") return { text: query.text };
  if (query.kind === "like") return { image_id: query.id };
  return { image_data: query.data };
}

// --- searching ------------------------------------------------------------------------------------------------

function search(query, { push = true } = {}) {
  state.query = query;
  state.results = [];
  state.hasMore = false;
  state.loading = false;
  state.token += 1;
  $("grid").replaceChildren();
  $("end").hidden = true;
  if (push && (!query || query.kind !== "upload")) history.pushState(null, "", urlFor(query));
  if (push && query && query.kind === "upload") history.pushState(null, "", urlFor(null));
  $("q").value = query && query.kind === "text" ? query.text : "";
  showQueryImage(query);
  if (!query && !QueryModel.hasPositive()) {
    showStats();
    return;
  }
  loadMore();
}

async function loadMore() {
  if (state.loading || !(state.query || QueryModel.hasPositive())) return;
  const token = state.token;
  const query = state.query;
  state.loading = true;
  setStatus(state.results.length ? "Loading more…" : "Searching…");
  try {
    const page = await fetchPage(query, state.results.length);
    if (token !== state.token) return;
    const first = state.results.length;
    state.results.push(...page.results);
    state.hasMore = page.has_more;
    appendTiles(page.results, first);
    const count = state.results.length;
    setStatus(count ? `${count}${state.hasMore ? "+" : ""} results · ${Math.round(page.took_ms)} ms` : "No results.");
    $("end").hidden = state.hasMore || !count;
  } catch (error) {
    if (token === state.token) setStatus(error.message, true);
  } finally {
    if (token === state.token) state.loading = false;
  }
  if (token === state.token && state.hasMore && sentinelVisible()) loadMore();
}

async function fetchPage(query, offset) {
  const response = await fetch("/api/query", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(QueryModel.body(mainTerm(query), offset, PAGE_SIZE)),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(describeError(body, response.status));
  return body;
}

function describeError(body, status) {
  if (typeof body.detail === "string") return body.detail;
  if (Array.isArray(body.detail) && body.detail.length) return body.detail.map((d) => d.msg).join("; ");
  return `the server answered ${status}`;
}

async function searchUpload(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That is not an image file.", true);
    return;
  }
  const url = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  search({ kind: "upload", blob: file, name: file.name || "pasted image", data: url.slice(url.indexOf(",") + 1) });
}

// --- rendering ------------------------------------------------------------------------------------------------

function appendTiles(results, first) {
  const fragment = document.createDocumentFragment();
  results.forEach((result, i) => {
    const tile = document.createElement("figure");
    tile.className = "tile";
    tile.tabIndex = 0;
    tile.dataset.index = String(first + i);
    tile.dataset.imageId = String(result.image_id);
    if (result.taken_at) tile.dataset.takenAt = result.taken_at;
    tile.title = result.path;
    const img = document.createElement("img");
    img.src = result.thumbnail_url;
    img.alt = baseName(result.path);
    img.loading = "lazy";
    img.decoding = "async";
    const label = document.createElement("div");
    label.className = "label";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = baseName(result.path);
    label.append(name);
    if (result.taken_at) {
      const date = document.createElement("span");
      date.className = "date";
      date.textContent = result.taken_at.slice(0, 10);
      label.append(date);
    }
    const score = document.createElement("figcaption");
    score.className = "score";
    score.textContent = result.stage === "itm" ? `ITM ${result.score.toFixed(3)}` : result.score.toFixed(3);
    if (result.stage === "itm") score.title = `re-ranker match probability; CLIP cosine ${result.clip_score.toFixed(3)}`;
    if (result.matched && result.matched !== "clip") {
      // found by the words read in the photo, or by its file name: said on the tile, not only by the score
      tile.classList.add("matched");
      score.textContent = `${result.matched} · ${score.textContent}`;
      score.title = result.matched === "text" ? "its text holds the words you typed" : "its file name matches";
    }
    tile.append(img, label, score);
    fragment.append(tile);
  });
  $("grid").append(fragment);
}

function showQueryImage(query) {
  const box = $("query-image");
  if (query && query.kind === "like") {
    $("query-image-thumb").src = `/api/images/${query.id}/thumbnail`;
    $("query-image-label").textContent = "More like this image";
  } else if (query && query.kind === "upload") {
    const old = $("query-image-thumb").src;
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
    $("query-image-thumb").src = URL.createObjectURL(query.blob);
    $("query-image-label").textContent = `Images like ${query.name}`;
  }
  box.hidden = !query || query.kind === "text";
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function showStats() {
  try {
    const stats = await (await fetch("/api/stats")).json();
    setStatus(`${stats.images.toLocaleString()} images indexed · type what you are looking for, or drop an image`);
  } catch {
    setStatus("Type what you are looking for, or drop an image.");
  }
}

function baseName(path) {
  return path.split(/[\\/]/).pop();
}

// --- the large view -------------------------------------------------------------------------------------------

function openViewer(index) {
  const result = state.results[index];
  if (!result) return;
  state.viewing = index;
  $("viewer-img").src = result.preview_url;
  $("viewer-img").alt = baseName(result.path);
  $("viewer-path").textContent = result.path;
  const size = result.width && result.height ? `${result.width} × ${result.height} · ` : "";
  const taken = result.taken_at ? `taken ${result.taken_at} · ` : "";
  $("viewer-facts").textContent = `${size}${taken}score ${result.score.toFixed(3)} · #${result.rank}`;
  $("viewer-original").href = result.file_url;
  showPhotoText(result.image_id, index);
  $("viewer-prev").disabled = index === 0;
  $("viewer-next").disabled = index >= state.results.length - 1;
  if (!$("viewer").open) $("viewer").showModal();
  if (index >= state.results.length - 3 && state.hasMore) loadMore();
}

// The caption (index --captions) and the text read in the photo (index --ocr), from GET /api/images/{id}; hidden
// when there is neither.
async function showPhotoText(imageId, index) {
  const box = $("viewer-text");
  box.hidden = true;
  box.textContent = "";
  try {
    const details = await (await fetch(`/api/images/${imageId}`)).json();
    if (state.viewing !== index) return;
    const parts = [];
    if (details.caption) parts.push(`Caption: ${details.caption}`);
    if (details.text && details.text.length) {
      parts.push(`Text in this photo: ${details.text.map((line) => line.text).join(" · ")}`);
    }
    if (!parts.length) return;
    box.textContent = parts.join("\n");
    box.hidden = false;
  } catch {
    // the facts above still stand; the text is a plus
  }
}

function closeViewer() {
  if ($("viewer").open) $("viewer").close();
}

// --- infinite scroll ------------------------------------------------------------------------------------------

function sentinelVisible() {
  return $("sentinel").getBoundingClientRect().top < window.innerHeight + 600;
}

// --- wiring ---------------------------------------------------------------------------------------------------

// A small original is shown at most this many times its own size: a 64-pixel photo is not blown up to a blur.
const MAX_UPSCALE = 2;

function capUpscale() {
  const img = $("viewer-img");
  img.style.maxWidth = `${img.naturalWidth * MAX_UPSCALE}px`;
  img.style.maxHeight = `${img.naturalHeight * MAX_UPSCALE}px`;
}

function wire() {
  $("viewer-img").addEventListener("load", capUpscale);
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("q").value.trim();
    if (text) search({ kind: "text", text });
  });
  $("file").addEventListener("change", () => {
    searchUpload($("file").files[0]);
    $("file").value = "";
  });
  $("grid").addEventListener("click", (event) => {
    const tile = event.target.closest(".tile");
    if (tile) openViewer(Number(tile.dataset.index));
  });
  $("grid").addEventListener("keydown", (event) => {
    const tile = event.target.closest(".tile");
    if (tile && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      openViewer(Number(tile.dataset.index));
    }
  });
  $("viewer-similar").addEventListener("click", () => {
    const result = state.results[state.viewing];
    closeViewer();
    if (result) {
      search({ kind: "like", id: result.image_id });
      window.scrollTo({ top: 0 });
    }
  });
  for (const [button, sign] of [["viewer-add", "+"], ["viewer-sub", "-"]]) {
    $(button).addEventListener("click", () => {
      const result = state.results[state.viewing];
      closeViewer();
      if (result) {
        QueryModel.add({ sign, imageId: result.image_id });
        search(state.query);
      }
    });
  }
  $("chip-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("chip-text").value.trim();
    if (!text) return;
    QueryModel.add({ sign: event.submitter && event.submitter.id === "chip-sub" ? "-" : "+", text });
    $("chip-text").value = "";
    search(state.query);
  });
  $("chips").addEventListener("click", (event) => {
    if (QueryModel.click(event.target)) search(state.query);
  });
  for (const id of QueryModel.filterIds) $(id).addEventListener("change", () => search(state.query));
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-prev").addEventListener("click", () => openViewer(state.viewing - 1));
  $("viewer-next").addEventListener("click", () => openViewer(state.viewing + 1));
  $("viewer").addEventListener("click", (event) => {
    if (event.target === $("viewer")) closeViewer(); // a click on the backdrop
  });
  $("viewer").addEventListener("keydown", (event) => {
    if (event.key === "ArrowLeft" && state.viewing > 0) openViewer(state.viewing - 1);
    if (event.key === "ArrowRight") openViewer(state.viewing + 1);
  });

  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting) && state.hasMore) loadMore();
  }, { rootMargin: "600px" }).observe($("sentinel"));

  let dragDepth = 0;
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    dragDepth += 1;
    $("drop-overlay").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) $("drop-overlay").hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    dragDepth = 0;
    $("drop-overlay").hidden = true;
    const file = event.dataTransfer?.files?.[0];
    if (!file) return;
    event.preventDefault();
    searchUpload(file);
  });
  document.addEventListener("paste", (event) => {
    const item = Array.from(event.clipboardData?.items || []).find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (!item) return; // plain text pastes into the search box as usual
    event.preventDefault();
    searchUpload(item.getAsFile());
  });
  window.addEventListener("popstate", () => {
    closeViewer();
    QueryModel.readUrl(new URLSearchParams(location.search));
    search(queryFromUrl(), { push: false });
  });
}

wire();
QueryModel.readUrl(new URLSearchParams(location.search));
search(queryFromUrl(), { push: false });
