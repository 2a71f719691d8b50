// clipsearch web page: the query model (retrieval/search/query.py) on the page. The main query (a text, an indexed
// image or an upload) plus chips (texts or indexed images, each added or taken away, with a weight) and the filter
// controls. It lives in the URL (?q=..&add=..&sub=..&after=..) and becomes one POST /api/query body.
"use strict";

const QueryModel = (() => {
  const WEIGHTED = /^(\d+(?:\.\d*)?|\.\d+):([\s\S]+)$/;
  const IMAGE = /^img:(\d+)$/;
  const RERANK_DEPTH = 50; // the dual encoder's top N that the re-ranker re-orders
  // The filters: one entry per field of Filters (retrieval/store/filters.py), which tests/test_query.py holds this
  // table and the controls in index.html to. param: the URL parameter; id: the control; kind: how the request body
  // carries the control's state (text, number, a comma-separated list, or a checkbox flag).
  const FILTERS = {
    under: { param: "under", id: "f-under", kind: "text" },
    after: { param: "after", id: "f-after", kind: "text" },
    before: { param: "before", id: "f-before", kind: "text" },
    camera: { param: "camera", id: "f-camera", kind: "text" },
    min_width: { param: "min_width", id: "f-min-width", kind: "number" },
    min_height: { param: "min_height", id: "f-min-height", kind: "number" },
    types: { param: "type", id: "f-type", kind: "list" },
    has_text: { param: "has_text", id: "f-has-text", kind: "flag" },
  };
  const READ = {
    text: (text) => text || null,
    number: (text) => (text ? Number(text) : null),
    list: (text) => text.split(",").map((t) => t.trim()).filter(Boolean),
    flag: (text) => (text ? true : null),
  };
  // The other controls kept in the URL (not filters): URL parameter -> control id.
  const CONTROLS = { min_score: "f-min-score", sort: "f-sort" };
  const URL_CONTROLS = [...Object.values(FILTERS).map(({ param, id }) => [param, id]), ...Object.entries(CONTROLS)];

  // A control's state as URL text: a checkbox is "1" or nothing.
  function controlText(id) {
    const control = $(id);
    return control.type === "checkbox" ? (control.checked ? "1" : "") : control.value.trim();
  }

  function setControlText(id, text) {
    const control = $(id);
    if (control.type === "checkbox") control.checked = text === "1";
    else control.value = text;
  }

  let chips = []; // {sign: "+" | "-", text?: string, imageId?: number, weight: number}

  // --- chips <-> URL ("2:snow", "img:42", "0.5:img:42": the CLI's [WEIGHT:]VALUE form) -------------------------

  function chipParam(chip) {
    const value = chip.imageId != null ? `img:${chip.imageId}` : chip.text;
    return chip.weight !== 1 || WEIGHTED.test(value) ? `${chip.weight}:${value}` : value;
  }

  function parseChip(param, sign) {
    let weight = 1;
    let value = param;
    const weighted = WEIGHTED.exec(param);
    if (weighted) {
      weight = Number(weighted[1]);
      value = weighted[2];
    }
    const image = IMAGE.exec(value);
    return image ? { sign, imageId: Number(image[1]), weight } : { sign, text: value, weight };
  }

  function readUrl(params) {
    chips = [
      ...params.getAll("add").filter(Boolean).map((p) => parseChip(p, "+")),
      ...params.getAll("sub").filter(Boolean).map((p) => parseChip(p, "-")),
    ];
    for (const [name, id] of URL_CONTROLS) setControlText(id, params.get(name) || (name === "sort" ? "relevance" : ""));
    $("f-rerank").checked = params.get("rerank") === "1";
    renderChips();
  }

  function writeUrl(params) {
    for (const chip of chips) params.append(chip.sign === "+" ? "add" : "sub", chipParam(chip));
    for (const [name, id] of URL_CONTROLS) {
      const value = controlText(id);
      if (value && !(name === "sort" && value === "relevance")) params.set(name, value);
    }
    if ($("f-rerank").checked) params.set("rerank", "1");
  }

  // --- the request body ------------------------------------------------------------------------------------------

  function term(chip) {
    return chip.imageId != null ? { image_id: chip.imageId, weight: chip.weight } : { text: chip.text, weight: chip.weight };
  }

  function filters() {
    const found = Object.entries(FILTERS).map(([field, { id, kind }]) => [field, READ[kind](controlText(id))]);
    return Object.fromEntries(found.filter(([, v]) => v !== null && !(Array.isArray(v) && !v.length)));
  }

  function body(mainTerm, offset, k) {
    const positive = mainTerm ? [mainTerm] : [];
    const negative = [];
    for (const chip of chips) (chip.sign === "+" ? positive : negative).push(term(chip));
    const minScore = $("f-min-score").value.trim();
    return {
      query: { positive, negative },
      filters: filters(),
      sort: $("f-sort").value || "relevance",
      min_score: minScore ? Number(minScore) : null,
      rerank: $("f-rerank").checked ? Math.max(RERANK_DEPTH, k) : null, // pages end at the re-ranked top N
      k,
      offset,
    };
  }

  // --- chips on the page -----------------------------------------------------------------------------------------

  function renderChips() {
    const box = $("chips");
    box.replaceChildren(
      ...chips.map((chip, index) => {
        const element = document.createElement("span");
        element.className = `chip ${chip.sign === "+" ? "positive" : "negative"}`;
        element.dataset.index = String(index);
        const sign = document.createElement("button");
        sign.type = "button";
        sign.className = "chip-sign";
        sign.textContent = chip.sign === "+" ? "+" : "−";
        sign.title = chip.sign === "+" ? "Added: click to take it away" : "Taken away: click to add it";
        sign.setAttribute("aria-label", sign.title);
        const label = document.createElement("span");
        label.className = "chip-label";
        if (chip.imageId != null) {
          const thumb = document.createElement("img");
          thumb.src = `/api/images/${chip.imageId}/thumbnail`;
          thumb.alt = `image ${chip.imageId}`;
          label.append(thumb);
        } else {
          label.textContent = chip.text;
        }
        if (chip.weight !== 1) label.append(` ×${chip.weight}`);
        const remove = document.createElement("button");
        remove.type = "button";
        remove.className = "chip-remove";
        remove.textContent = "×";
        remove.title = "Remove";
        remove.setAttribute("aria-label", "Remove");
        element.append(sign, label, remove);
        return element;
      }),
    );
    box.hidden = !chips.length;
  }

  function add(chip) {
    chips.push({ weight: 1, ...chip });
    renderChips();
  }

  // Clicks on a chip: flip its sign or remove it; true when the query changed.
  function click(target) {
    const element = target.closest(".chip");
    if (!element) return false;
    const chip = chips[Number(element.dataset.index)];
    if (target.closest(".chip-sign")) chip.sign = chip.sign === "+" ? "-" : "+";
    else if (target.closest(".chip-remove")) chips.splice(Number(element.dataset.index), 1);
    else return false;
    renderChips();
    return true;
  }

  return {
    readUrl, writeUrl, body, add, click,
    hasPositive: () => chips.some((chip) => chip.sign === "+"),
    filterIds: [...URL_CONTROLS.map(([, id]) => id), "f-rerank"],
  };
})();
