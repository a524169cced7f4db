// The feature-forest explorer. Reads the JSON block #report-data and builds every element with
// createElement/textContent (never innerHTML), so corpus text is always shown as text.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const F = data.features;
  const meta = data.meta;
  const SVG = "http://www.w3.org/2000/svg";
  const MODEL_COLOURS = { hsae: "#1f6fd1", baseline: "#f08c2e", matryoshka: "#2ca02c" };
  const GROUP_COLOURS = ["#1f6fd1", "#2ca02c", "#9467bd", "#17becf", "#bcbd22", "#d62728"];
  const nodes = {};
  let selectedRow = null;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  const frequency = (f) => f.fires / Math.max(meta.tokens_scanned, 1);
  const pct = (x) => (x >= 0.001 || x === 0 ? (100 * x).toFixed(2) : (100 * x).toPrecision(2)) + "%";
  const shown = (t) => t.replace(/\n/g, "\u23ce");
  const name = (key) => "L" + F[key].level + " #" + F[key].index;
  const fmt = (x) => (x === null || x === undefined || Number.isNaN(x) ? "n/a" : Number(x).toPrecision(3));

  // --- header --------------------------------------------------------------------------------
  function header() {
    document.getElementById("title").textContent =
      "Feature forest \u2014 " + meta.run + " (" + meta.which + ")";
    document.getElementById("meta").textContent =
      "model " + meta.model + ", layer " + meta.layer + "; levels " + meta.level_sizes.join(" / ") +
      "; " + meta.tokens_scanned.toLocaleString("en") + " " + meta.split + " tokens scanned; " +
      "generated " + meta.generated;
    if (meta.truncated) {
      const note = document.getElementById("truncation");
      note.hidden = false;
      note.textContent =
        "Truncated: showing " + meta.shown_features + " of " + meta.total_features +
        " features (" + meta.shown_trees + " of " + meta.total_trees + " trees, the largest " +
        "first; at most " + meta.settings.max_children + " children per node). Raise " +
        "--max-features / --max-children to embed more.";
    }
  }

  // --- forest --------------------------------------------------------------------------------
  function labelBadge(f) {
    if (f.label) return el("span", "label", f.label);
    if (f.auto_label) return el("span", "label auto", "auto: " + f.auto_label);
    return null;
  }

  function nodeItem(key) {
    const f = F[key];
    const li = el("li", "node");
    li.dataset.feature = key;
    li.dataset.level = f.level;
    li.setAttribute("role", "treeitem");
    const row = el("div", "row");
    const toggle = el("button", "toggle", f.children.length ? "\u25b8" : "\u00b7");
    toggle.disabled = f.children.length === 0;
    toggle.setAttribute("aria-label", "expand " + name(key));
    const title = el("button", "name", name(key));
    let info = pct(frequency(f)) + " \u00b7 " + f.n_children + (f.n_children === 1 ? " child" : " children");
    if (f.children.length < f.n_children) info += " (" + f.children.length + " shown)";
    if (f.p_parent !== null) info += " \u00b7 P(parent|child) " + f.p_parent.toFixed(2);
    row.append(toggle, title, el("span", "info", info));
    const badge = labelBadge(f);
    if (badge) row.append(badge);
    li.append(row);
    toggle.addEventListener("click", () => setOpen(key, li.dataset.open !== "1"));
    title.addEventListener("click", () => select(key));
    nodes[key] = li;
    return li;
  }

  function setOpen(key, open) {
    const li = nodes[key];
    const f = F[key];
    if (!li || f.children.length === 0) return;
    let list = li.querySelector(":scope > ul");
    if (!list) {
      list = el("ul");
      list.setAttribute("role", "group");
      for (const child of f.children) list.append(nodeItem(child));
      li.append(list);
    }
    list.hidden = !open;
    li.dataset.open = open ? "1" : "0";
    const toggle = li.querySelector(":scope > .row > .toggle");
    toggle.textContent = open ? "\u25be" : "\u25b8";
    toggle.setAttribute("aria-expanded", String(open));
  }

  function reveal(key) {
    const chain = [];
    for (let k = F[key].parent; k && F[k]; k = F[k].parent) chain.unshift(k);
    for (const k of chain) setOpen(k, true);
    const li = nodes[key];
    if (li) li.scrollIntoView({ block: "nearest" });
  }

  function forest() {
    const list = el("ul");
    for (const key of data.roots) list.append(nodeItem(key));
    document.getElementById("tree").append(list);
  }

  // --- feature detail ------------------------------------------------------------------------
  function contextView(index, peak) {
    const ctx = data.contexts[index];
    const line = el("div", "ctx");
    line.append(el("span", "value", ctx.a[ctx.at].toFixed(2)));
    ctx.t.forEach((token, i) => {
      const span = el("span", "tok", shown(data.tokens[token]));
      const a = ctx.a[i];
      if (a > 0) {
        span.classList.add("hot");
        span.style.backgroundColor =
          "rgba(255, 102, 0, " + Math.min(1, 0.12 + (0.88 * a) / peak).toFixed(3) + ")";
      }
      if (i === ctx.at) span.classList.add("at");
      span.title = "activation " + a;
      line.append(span);
    });
    return line;
  }

  function statsTable(key) {
    const f = F[key];
    const table = el("table", "stats");
    const add = (label, value) => {
      const tr = el("tr");
      const td = el("td");
      if (value instanceof Node) td.append(value);
      else td.textContent = value;
      tr.append(el("td", "", label), td);
      table.append(tr);
    };
    add("firing frequency", pct(frequency(f)) + " (" + f.fires + " tokens)");
    add("children", f.n_children + (f.children.length < f.n_children ? " (" + f.children.length + " shown)" : ""));
    add("descendants", f.descendants);
    if (f.parent) {
      const link = el("button", "link", f.parent in F ? name(f.parent) : f.parent);
      link.addEventListener("click", () => go(f.parent));
      add("parent", link);
      add("P(parent | child)", fmt(f.p_parent));
    } else add("parent", "none (root)");
    return table;
  }

  // What adding the feature's direction does to the next-token logits (direct path only).
  function lensView(f) {
    const box = el("div", "lens");
    const info = meta.logit_lens || {};
    box.append(el("h3", "", "Next-token effect (logit lens)"));
    if (!f.lens) {
      box.append(el("p", "muted", "Not in this report" + (info.note ? ": " + info.note : "") + "."));
      return box;
    }
    const rows = [["promotes", f.lens.promoted, "up"], ["suppresses", f.lens.suppressed, "down"]];
    for (const [title, entries, kind] of rows) {
      const line = el("div", "chips lens-" + kind);
      line.append(el("span", "muted lens-title", title));
      for (const [token, score] of entries) {
        const chip = el("span", "chip " + kind, shown(data.tokens[token]));
        chip.title = "direct logit score " + (score > 0 ? "+" : "") + fmt(score) + " (compare within a feature)";
        line.append(chip);
      }
      box.append(line);
    }
    return box;
  }

  function select(key) {
    const f = F[key];
    const detail = document.getElementById("detail");
    detail.replaceChildren();
    detail.dataset.feature = key;
    const heading = el("h2", "", name(key));
    const badge = labelBadge(f);
    if (badge) heading.append(" ", badge);
    detail.append(heading, statsTable(key));
    if (f.children.length) {
      const kids = el("div", "chips");
      for (const child of f.children) {
        const b = el("button", "link", name(child));
        b.addEventListener("click", () => go(child));
        kids.append(b);
      }
      detail.append(el("h3", "", "Children"), kids);
    }
    detail.append(el("h3", "", "Fires most on"));
    const chips = el("div", "chips");
    for (const [token, count] of f.top_tokens) chips.append(el("span", "chip", shown(data.tokens[token]) + " \u00d7" + count));
    if (!f.top_tokens.length) chips.append(el("span", "muted", "never fired on the scanned tokens"));
    detail.append(chips, lensView(f));
    const peak = Math.max(1e-9, ...f.top.map((i) => data.contexts[i].a[data.contexts[i].at]));
    detail.append(el("h3", "", "Top activations"));
    for (const i of f.top) detail.append(contextView(i, peak));
    if (f.sampled.length) {
      detail.append(el("h3", "", "Sampled in proportion to activation"));
      for (const i of f.sampled) detail.append(contextView(i, peak));
    }
    if (selectedRow) selectedRow.classList.remove("selected");
    selectedRow = nodes[key] ? nodes[key].querySelector(":scope > .row") : null;
    if (selectedRow) selectedRow.classList.add("selected");
  }

  function go(key) {
    if (!(key in F)) {
      results([], "feature " + key + " is not among the " + meta.shown_features + " features in this report");
      return;
    }
    reveal(key);
    select(key);
  }

  // --- search --------------------------------------------------------------------------------
  function results(items, message) {
    const box = document.getElementById("results");
    box.replaceChildren();
    if (message) box.append(el("span", "muted", message));
    for (const [key, why] of items.slice(0, 60)) {
      const b = el("button", "result", name(key) + (why ? " \u2014 " + why : ""));
      b.dataset.feature = key;
      b.addEventListener("click", () => go(key));
      box.append(b);
    }
  }

  function search(query) {
    const q = query.trim();
    if (!q) return results([]);
    let m = /^(?:L)?(\d+)\s*[:#]\s*(\d+)$/i.exec(q);
    if (m) {
      const key = m[1] + ":" + m[2];
      if (key in F) results([[key, "feature"]]);
      return go(key);
    }
    if (/^\d+$/.test(q)) {
      const hits = Object.keys(F).filter((k) => F[k].index === Number(q)).map((k) => [k, ""]);
      return results(hits, hits.length ? "" : "no feature #" + q + " among the features shown");
    }
    const needle = q.toLowerCase();
    const matching = new Set();
    data.tokens.forEach((t, i) => { if (t.toLowerCase().trim() === needle || t.toLowerCase().includes(needle)) matching.add(i); });
    const hits = [];
    for (const [key, f] of Object.entries(F)) {
      let score = 0;
      let why = "";
      for (const [token, count] of f.top_tokens) {
        if (matching.has(token)) { score += count; if (!why) why = "\u201c" + shown(data.tokens[token]) + "\u201d \u00d7" + count; }
      }
      for (const i of f.top.concat(f.sampled)) {
        const c = data.contexts[i];
        if (matching.has(c.t[c.at])) { score += 1; if (!why) why = "\u201c" + shown(data.tokens[c.t[c.at]]) + "\u201d in a top context"; }
      }
      const label = (f.label || f.auto_label || "").toLowerCase();
      if (label.includes(needle)) { score += 1000; why = "label: " + (f.label || f.auto_label); }
      if (score > 0) hits.push([key, why, score]);
    }
    hits.sort((a, b) => b[2] - a[2]);
    results(hits, hits.length ? hits.length + " features" : "no feature fires on \u201c" + q + "\u201d");
  }

  // --- charts --------------------------------------------------------------------------------
  function barChart(title, categories, series, note) {
    const w = Math.max(250, 90 + categories.length * series.length * 30 + categories.length * 16);
    const h = 190, top = 28, bottom = 40, left = 44;
    const values = series.flatMap((s) => s.values).filter((v) => v !== null && !Number.isNaN(v));
    const hi = Math.max(0, ...values), lo = Math.min(0, ...values);
    const span = hi - lo || 1;
    const y = (v) => top + ((hi - v) / span) * (h - top - bottom);
    const box = el("div", "chart");
    const root = svg("svg", { width: w, height: h, role: "img", "aria-label": title });
    root.append(svg("text", { x: 6, y: 14, class: "title" }, title));
    if (note) root.append(svg("text", { x: w - 6, y: 14, "text-anchor": "end", class: "v" }, note));
    root.append(svg("line", { x1: left, x2: w - 6, y1: y(0), y2: y(0), stroke: "#999" }));
    root.append(svg("text", { x: 4, y: y(hi) + 4 }, fmt(hi)));
    if (lo < 0) root.append(svg("text", { x: 4, y: y(lo) + 4 }, fmt(lo)));
    const group = series.length * 30 + 16;
    categories.forEach((category, c) => {
      series.forEach((s, k) => {
        const v = s.values[c];
        if (v === null || v === undefined || Number.isNaN(v)) return;
        const x = left + 6 + c * group + k * 30;
        const rect = svg("rect", { x: x, y: Math.min(y(v), y(0)), width: 26, height: Math.max(1, Math.abs(y(v) - y(0))), fill: s.colour });
        rect.append(svg("title", {}, s.name + " " + category + ": " + fmt(v)));
        root.append(rect, svg("text", { x: x, y: Math.min(y(v), y(0)) - 3, class: "v" }, fmt(v)));
      });
      root.append(svg("text", { x: left + 6 + c * group, y: h - bottom + 16 }, category));
    });
    let lx = left;
    for (const s of series) {
      root.append(svg("rect", { x: lx, y: h - 14, width: 10, height: 10, fill: s.colour }), svg("text", { x: lx + 14, y: h - 5 }, s.name));
      lx += 90;
    }
    box.append(root);
    return box;
  }

  function charts() {
    const holder = document.getElementById("charts");
    const m = data.metrics;
    if (!m || !m.hsae) {
      const note = document.getElementById("metrics-note");
      note.hidden = false;
      note.textContent = "No metrics.json in the run folder: run `hsae eval " + meta.run + "` and regenerate the report.";
      return;
    }
    const names = Object.keys(m);
    const series = (get) => names.map((n) => ({ name: n, colour: MODEL_COLOURS[n] || "#777", values: get(m[n]) }));
    holder.append(
      barChart("Hamming per 1k tokens", ["all levels"], series((x) => [x.hierarchy.hamming_per_1k]), "lower is better"),
      barChart("P(parent | child)", ["all levels"], series((x) => [x.hierarchy.p_parent_given_child]), "higher is better"),
      barChart("P(child | parent)", ["all levels"], series((x) => [x.hierarchy.p_child_given_parent]), "higher is better"),
    );
    const levels = m.hsae.l0.map((_, i) => "L" + i);
    holder.append(
      barChart("L0 per level", levels, series((x) => x.l0)),
      barChart("Variance explained per level", levels, series((x) => x.variance_explained)),
    );
    // The full suite's charts: titles, notes and values come from the evaluation registry.
    const pairs = levels.slice(1).map((l, i) => "L" + i + "-" + l);
    for (const chart of m.hsae.suite || []) {
      const valuesOf = (x) => ((x.suite || []).find((c) => c.key === chart.key) || { values: [] }).values;
      holder.append(barChart(chart.title, chart.per_pair ? pairs : levels, series(valuesOf), chart.note));
    }
  }

  // --- projection ----------------------------------------------------------------------------
  function projection() {
    const p = data.projection;
    const note = document.getElementById("projection-note");
    if (!p) { note.textContent = "Projection disabled (--projection none)."; return; }
    if (!p.points) { note.textContent = p.note; return; }
    note.textContent = (p.method === "umap" ? "UMAP" : "PCA") + " of activations that trigger sibling features and one unrelated feature" + (p.note ? ". " + p.note : "") + ".";
    if (p.method === "umap") note.classList.remove("note");
    const w = 520, h = 380, pad = 20;
    const xs = p.points.map((q) => q[0]), ys = p.points.map((q) => q[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (v) => pad + ((v - x0) / (x1 - x0 || 1)) * (w - 2 * pad);
    const sy = (v) => h - pad - ((v - y0) / (y1 - y0 || 1)) * (h - 2 * pad);
    const root = svg("svg", { width: w, height: h, role: "img", "aria-label": "projection" });
    for (const [a, b, g] of p.points) {
      const colour = p.groups[g].role === "unrelated" ? "#d62728" : GROUP_COLOURS[g % 5];
      root.append(svg("circle", { cx: sx(a).toFixed(1), cy: sy(b).toFixed(1), r: 3.2, fill: colour, "fill-opacity": 0.75 }));
    }
    const legend = el("div", "legend");
    p.groups.forEach((g, i) => {
      const item = el("button", "link");
      const sw = el("span", "swatch");
      sw.style.background = g.role === "unrelated" ? "#d62728" : GROUP_COLOURS[i % 5];
      item.append(sw, (g.feature in F ? name(g.feature) : g.feature) + " (" + g.role + ")");
      item.addEventListener("click", () => go(g.feature));
      legend.append(item);
    });
    document.getElementById("projection").append(legend, root);
  }

  header();
  forest();
  charts();
  projection();
  const box = document.getElementById("search");
  box.addEventListener("input", () => search(box.value));
  box.addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    const first = document.querySelector("#results .result");
    if (first) go(first.dataset.feature);
  });
  if (data.roots.length) select(data.roots[0]);
})();
