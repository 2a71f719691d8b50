// clipsearch duplicates page: groups of near-identical photos, the file to keep (most pixels, then bytes) first.
// The threshold lives in the URL (?threshold=0.95). Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);

function bytes(count) {
  for (const [unit, scale] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (count >= scale) return `${(count / scale).toFixed(1)} ${unit}`;
  }
  return `${count} B`;
}

function tile(member, keep) {
  const figure = document.createElement("figure");
  figure.className = "dup-tile" + (keep ? " keep" : "");
  figure.title = member.path;
  const link = document.createElement("a");
  link.href = member.file_url;
  link.target = "_blank";
  link.rel = "noopener";
  const img = document.createElement("img");
  img.src = member.thumbnail_url;
  img.alt = member.path.split(/[\\/]/).pop();
  img.loading = "lazy";
  link.append(img);
  const caption = document.createElement("figcaption");
  const size = member.width && member.height ? `${member.width}×${member.height}` : "?";
  caption.textContent = `${keep ? "keep · " : ""}${size} · ${bytes(member.size)} · cos ${member.score.toFixed(3)} · px ${member.pixels.toFixed(3)}`;
  const name = document.createElement("code");
  name.textContent = img.alt;
  figure.append(link, caption, name);
  return figure;
}

async function load(threshold) {
  $("status").textContent = "Comparing every photo with every other…";
  $("status").classList.remove("error");
  $("groups").replaceChildren();
  const response = await fetch(`/api/duplicates?threshold=${encodeURIComponent(threshold)}`);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    $("status").textContent = typeof body.detail === "string" ? body.detail : `the server answered ${response.status}`;
    $("status").classList.add("error");
    return;
  }
  const fragment = document.createDocumentFragment();
  body.groups.forEach((group, number) => {
    const section = document.createElement("section");
    section.className = "dup-group";
    const heading = document.createElement("h2");
    heading.textContent = `Group ${number + 1} · ${group.members.length} photos`;
    const row = document.createElement("div");
    row.className = "dup-row";
    group.members.forEach((member, i) => row.append(tile(member, i === 0)));
    section.append(heading, row);
    fragment.append(section);
  });
  $("groups").append(fragment);
  const shown = body.groups.length < body.total_groups ? ` (first ${body.groups.length} shown)` : "";
  $("status").textContent = body.total_groups
    ? `${body.total_groups} groups of near-duplicates at ${body.threshold}${shown} · ${Math.round(body.took_ms)} ms`
    : `No near-duplicates at ${body.threshold}.`;
}

$("dup-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const threshold = $("threshold").value || "0.95";
  history.pushState(null, "", `/duplicates?threshold=${encodeURIComponent(threshold)}`);
  load(threshold);
});
window.addEventListener("popstate", () => {
  const threshold = new URLSearchParams(location.search).get("threshold") || "0.95";
  $("threshold").value = threshold;
  load(threshold);
});
const initial = new URLSearchParams(location.search).get("threshold") || "0.95";
$("threshold").value = initial;
load(initial);
