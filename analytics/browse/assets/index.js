/* index.html: every feature of data/index.js, filtered by the search box, sorted by a column.
   The state (search, sort) lives in the URL's hash, so "back" from a feature page keeps it. */
"use strict";
(function () {
  var B = Browse;
  var idx = window.BROWSE_INDEX;
  var tbody = document.getElementById("rows");
  var search = document.getElementById("search");
  var count = document.getElementById("count");
  if (!idx) {
    var err = document.getElementById("error");
    err.hidden = false;
    err.textContent = "data/index.js did not load: rebuild the site with python -m analytics.browse --out DIR";
    return;
  }
  var meta = idx.meta;
  var C = {};
  idx.columns.forEach(function (c, i) { C[c] = i; });
  var rows = idx.rows;
  var hay = rows.map(function (r) {
    return ["#" + r[C.feature], r[C.label], r[C.top].join(" "), r[C.logits].join(" "), r[C.meta]].join(" ").toLowerCase();
  });
  var state = { q: "", sort: "feature", desc: false };

  document.title = "Features of " + meta.sae + " (layer " + meta.layer + ")";
  document.getElementById("title").textContent = "SAE " + meta.sae + " \u00b7 layer " + meta.layer;
  document.getElementById("meta").textContent = meta.n_cards + " features with cards (of " + meta.d_sae +
    "), " + meta.n_labelled + " labelled \u00b7 feature_cards run " + meta.cards_runs.join(", ") + " \u00b7 token set " +
    meta.token_set + " \u00b7 store " + meta.store + " \u00b7 built " + meta.generated_at;

  function sortValue(r, key) {
    var v = r[C[key]];
    if (v == null || (typeof v === "number" && isNaN(v))) return null;
    return key === "importance" ? Math.abs(v) : v;
  }

  var order = rows.map(function (_, i) { return i; });
  function sortRows() {
    var key = state.sort, dir = state.desc ? -1 : 1;
    order.sort(function (a, b) {
      var x = sortValue(rows[a], key), y = sortValue(rows[b], key);
      if (x === y) return rows[a][C.feature] - rows[b][C.feature];
      if (x === null) return 1;  // missing values last, whichever the direction
      if (y === null) return -1;
      return x < y ? -dir : dir;
    });
    document.querySelectorAll("th.sortable").forEach(function (th) {
      th.classList.toggle("sorted", th.dataset.key === key);
      th.dataset.dir = th.dataset.key === key ? (state.desc ? "desc" : "asc") : "";
    });
  }

  function tokens(list) {
    return list.map(function (t) { return '<span class="tok">' + B.esc(B.tok(t)) + "</span>"; }).join(" ");
  }

  function rowHtml(r) {
    var f = r[C.feature];
    var label = r[C.label] ? B.esc(r[C.label]) : '<span class="none">no label</span>';
    if (r[C.label_source] === "human") label += ' <span class="badge">human</span>';
    return '<tr data-feature="' + f + '"><td><a href="feature.html?f=' + f + '">' + f + "</a></td>" +
      '<td class="label">' + label + "</td>" +
      '<td class="num">' + B.fmt(r[C.density]) + "</td>" +
      '<td class="num">' + B.fmt(r[C.importance]) + "</td>" +
      '<td class="num">' + B.fmt(r[C.score]) + "</td>" +
      '<td class="toks">' + tokens(r[C.top]) + "</td>" +
      '<td class="toks">' + tokens(r[C.logits]) + "</td>" +
      '<td class="meta-text">' + B.esc(r[C.meta]) + "</td></tr>";
  }

  var LIMIT = meta.index_rows || 5000;  // rows drawn at once (--index-rows; "show all" draws the rest)
  var showAll = false;
  var more = document.getElementById("more");
  function render() {
    var terms = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    var html = [], n = 0;
    for (var k = 0; k < order.length; k++) {
      var i = order[k], h = hay[i], ok = true;
      for (var j = 0; j < terms.length && ok; j++) ok = h.indexOf(terms[j]) >= 0;
      if (ok) {
        if (showAll || n < LIMIT) html.push(rowHtml(rows[i]));
        n++;
      }
    }
    tbody.innerHTML = html.join("");
    count.textContent = n + " of " + rows.length + " features";
    more.hidden = html.length >= n;
    more.textContent = "show all " + n + " (" + html.length + " drawn)";
  }
  more.addEventListener("click", function () { showAll = true; render(); });

  function saveState() {
    var h = "q=" + encodeURIComponent(state.q) + "&sort=" + state.sort + "&dir=" + (state.desc ? "desc" : "asc");
    history.replaceState(null, "", "#" + h);
  }

  function loadState() {
    var p = new URLSearchParams(location.hash.slice(1));
    if (p.has("q")) state.q = p.get("q");
    if (p.has("sort") && C[p.get("sort")] !== undefined) state.sort = p.get("sort");
    if (p.has("dir")) state.desc = p.get("dir") === "desc";
  }

  loadState();
  search.value = state.q;
  sortRows();
  render();
  search.addEventListener("input", function () { state.q = search.value; render(); saveState(); });
  document.querySelectorAll("th.sortable").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.dataset.key;
      state.desc = key === state.sort ? !state.desc : key !== "feature";  // numbers: largest first
      state.sort = key;
      sortRows();
      render();
      saveState();
    });
  });
  var ms = performance.now();
  document.body.dataset.renderMs = ms.toFixed(1);
  document.body.dataset.ready = "1";
  document.getElementById("timing").textContent = rows.length + " features listed " + ms.toFixed(0) +
    " ms after the page was opened";
})();
