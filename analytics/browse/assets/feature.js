/* feature.html?f=ID: one feature's page, from its lazily loaded shard features/NNNN.js.
   Every text goes in through textContent (el() below), never as markup. Every number carries the
   SQL that reads it back from the store (data-sql; shown on click, and as its title). */
"use strict";
(function () {
  var B = Browse;
  var meta = window.BROWSE_SITE;
  var page = document.getElementById("page");
  var hover = document.getElementById("hover");

  function el(tag, attrs) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c == null) continue;
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return e;
  }

  function fail(msg) {
    page.textContent = "";
    page.appendChild(el("p", { cls: "error", id: "error", text: msg }));
  }

  function num(x, sql) {
    return el("span", { cls: "num", "data-sql": sql, title: sql, text: B.fmt(x) });
  }

  function section(title, id) {
    var s = el("section", { id: id });
    s.appendChild(el("h2", { text: title }));
    page.appendChild(s);
    return s;
  }

  var params = new URLSearchParams(location.search);
  var fText = params.get("f") || new URLSearchParams(location.hash.slice(1)).get("f");
  if (!meta) return fail("data/site.js did not load: rebuild the site with python -m analytics.browse --out DIR");
  var f = Number(fText);
  if (fText === null || !Number.isInteger(f) || f < 0 || f >= meta.d_sae) {
    return fail("feature " + JSON.stringify(fText) + " is not a feature id of SAE " + meta.sae + ": use feature.html?f=N with N in 0.." + (meta.d_sae - 1));
  }
  document.title = "Feature " + f + " \u00b7 " + meta.sae;
  document.getElementById("where").textContent = "SAE " + meta.sae + " \u00b7 layer " + meta.layer;
  document.getElementById("prev").href = "feature.html?f=" + Math.max(0, f - 1);
  document.getElementById("next").href = "feature.html?f=" + Math.min(meta.d_sae - 1, f + 1);
  document.getElementById("goto").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var v = document.getElementById("goto-f").value;
    if (v !== "") location.href = "feature.html?f=" + encodeURIComponent(v);
  });

  var shard = Math.floor(f / meta.shard_size);
  B.loadScript("features/" + B.pad4(shard) + ".js", function () {
    var rec = ((window.BROWSE_SHARDS || {})[shard] || {})[String(f)];
    if (!rec) return fail("feature " + f + " has no card in feature_cards run(s) " + meta.cards_runs.join(", ") + " (" + meta.n_cards + " of " + meta.d_sae + " features have one)");
    render(rec);
  }, function () {
    fail("features/" + B.pad4(shard) + ".js did not load: feature " + f + " has no card in this site");
  });

  var runId = null;  // the card's feature_cards run
  function cs(expr) { return B.cardSql(meta, runId, f, expr); }

  function render(rec) {
    runId = rec.run_id;
    page.textContent = "";
    var cur = null;
    (rec.labels || []).forEach(function (l) {
      if (rec.current && l.method === rec.current.method && l.run_id === rec.current.run_id) cur = l;
    });
    var head = el("header", { cls: "fhead" }, el("h1", { text: "Feature " + f }));
    head.appendChild(el("p", { cls: "label", id: "label", text: cur ? cur.explanation : "no label yet (python -m analytics.label_features)" }));
    if (cur) head.appendChild(el("p", { cls: "meta", text: "label: " + cur.method + " by " + cur.explainer + " (source " + cur.source + ")" }));
    page.appendChild(head);

    var grid = el("div", { cls: "grid" });
    page.appendChild(grid);
    grid.appendChild(statsBlock(rec));
    grid.appendChild(histBlock(rec));
    grid.appendChild(logitBlock(rec));
    grid.appendChild(assocBlock(rec));
    labelsBlock(rec);
    contextsBlock(rec, "Top activations", "top", rec.top, null);
    contextsBlock(rec, "Quantile samples", "quantiles", rec.quantiles, 1);
    document.body.dataset.renderMs = performance.now().toFixed(1);
    document.body.dataset.ready = "1";
  }

  function statsBlock(rec) {
    var s = el("section", { id: "stats" }, el("h2", { text: "Statistics" }));
    var t = el("table", { cls: "kv" });
    var rows = [
      ["density", "density", "share of token-set tokens it fires on"],
      ["n_firing", "n_firing", "tokens it fires on"],
      ["n_tokens", "n_tokens", "tokens of the token set"],
      ["max_act", "max_act", "largest activation"],
      ["mean_act", "mean_act", "mean activation where it fires"],
      ["importance", "importance", (rec.importance_method || "") + " " + (rec.importance_metric || "")],
      ["attribution_rho", "attribution_rho", "Spearman of the row-mean activation with attribution rank"]
    ];
    rows.forEach(function (r) {
      var sql = cs(r[1]);
      t.appendChild(el("tr", { "data-key": r[0] }, el("th", { text: r[0], title: r[2] }),
        el("td", {}, num(rec[r[0]], sql)), el("td", {}, el("code", { cls: "sql", text: sql }))));
    });
    s.appendChild(t);
    return s;
  }

  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  function histBlock(rec) {
    var s = el("section", { id: "histogram" }, el("h2", { text: "Activation histogram" }));
    var counts = rec.hist_counts || [], edges = rec.hist_edges || [];
    if (!counts.length) {
      s.appendChild(el("p", { cls: "none", text: "no activations" }));
      return s;
    }
    var W = 440, H = 150, pad = 44, max = Math.max.apply(null, counts.concat([1]));
    var g = svg("svg", { width: W, height: H + pad, viewBox: "0 0 " + W + " " + (H + pad), role: "img" });
    var bw = (W - 2 * pad) / counts.length;
    counts.forEach(function (c, i) {
      var h = (H - 10) * c / max;
      var r = svg("rect", { x: pad + i * bw + 0.5, y: H - h, width: Math.max(bw - 1, 1), height: h, class: "bar",
        "data-sql": cs("hist_counts[" + (i + 1) + "]") });
      var title = svg("title", {});
      title.textContent = "[" + B.fmt(edges[i]) + ", " + B.fmt(edges[i + 1]) + "): " + c + " tokens";
      r.appendChild(title);
      g.appendChild(r);
    });
    g.appendChild(svg("line", { x1: pad, y1: H, x2: W - pad, y2: H, class: "axis" }));
    [[0, "start"], [counts.length, "end"]].forEach(function (p) {
      var t = svg("text", { x: pad + p[0] * bw, y: H + 16, "text-anchor": p[1], class: "tick" });
      t.textContent = B.fmt(edges[p[0]]);
      g.appendChild(t);
    });
    var yl = svg("text", { x: pad - 4, y: 12, "text-anchor": "end", class: "tick" });
    yl.textContent = String(max);
    g.appendChild(yl);
    s.appendChild(g);
    s.appendChild(el("p", { cls: "meta", text: "activation (x) \u00b7 firing tokens per bin (y)" }));
    s.appendChild(el("code", { cls: "sql", text: cs("hist_edges, hist_counts") }));
    return s;
  }

  function logitBlock(rec) {
    var s = el("section", { id: "logits" }, el("h2", { text: "Logit effects (W_dec \u00b7 W_U)" }));
    var wrap = el("div", { cls: "two" });
    [["top", "raised", rec.logit_top], ["bottom", "lowered", rec.logit_bottom]].forEach(function (side) {
      var t = el("table", { cls: "logit " + side[0] });
      t.appendChild(el("tr", {}, el("th", { text: side[1] }), el("th", { text: "effect" })));
      (side[2] || []).forEach(function (p, i) {
        t.appendChild(el("tr", {}, el("td", {}, el("span", { cls: "tok", text: B.tok(p[0]) })),
          el("td", {}, num(p[1], cs("logit_" + side[0] + "_values[" + (i + 1) + "]")))));
      });
      wrap.appendChild(t);
    });
    s.appendChild(wrap);
    return s;
  }

  function assocBlock(rec) {
    var s = el("section", { id: "assoc" }, el("h2", { text: "Metadata associations" }));
    var list = rec.assoc || [];
    if (!list.length) {
      s.appendChild(el("p", { cls: "none", text: "none significant (python -m analytics.correlations fills feature_metadata_assoc)" }));
      return s;
    }
    var t = el("table", { cls: "assoc" });
    list.forEach(function (a, i) {
      var stat = a[2], effect = a[3];
      var centre = stat === "auroc" ? 0.5 : 0, span = stat === "auroc" ? 0.5 : 1;
      var d = effect == null ? 0 : Math.max(-1, Math.min(1, (effect - centre) / span));
      var bar = el("div", { cls: "bar-track" }, el("div", {
        cls: "bar-fill " + (d >= 0 ? "pos" : "neg"),
        style: "left:" + (50 + Math.min(d, 0) * 50) + "%;width:" + Math.abs(d) * 50 + "%"
      }));
      var name = a[1] ? a[0] + " = " + a[1] : a[0];
      t.appendChild(el("tr", {}, el("th", { text: name }), el("td", { cls: "stat", text: stat }),
        el("td", { cls: "bar-cell" }, bar), el("td", {}, num(effect, cs("assoc[" + (i + 1) + "].effect"))),
        el("td", {}, "q ", num(a[5], cs("assoc[" + (i + 1) + "].q_value")))));
    });
    s.appendChild(t);
    s.appendChild(el("p", { cls: "meta", text: "bars: AUROC around 0.5, Spearman around 0" }));
    return s;
  }

  function labelsBlock(rec) {
    var s = section("Labels and scores", "labels");
    var labels = rec.labels || [];
    if (!labels.length) {
      s.appendChild(el("p", { cls: "none", text: "no labels: python -m analytics.label_features --sae " + meta.sae + " --features " + f + "," }));
      return;
    }
    var t = el("table", { cls: "labels" });
    t.appendChild(el("tr", {}, el("th", { text: "method" }), el("th", { text: "explanation" }), el("th", { text: "explainer" }),
      el("th", { text: "detection bacc" }), el("th", { text: "fuzzing bacc" }), el("th", { text: "AUROC [95% CI]" }),
      el("th", { text: "confidence" })));
    labels.forEach(function (l) {
      var ls = function (e) { return B.labelSql(meta, f, l, e); };
      var isCur = rec.current && l.method === rec.current.method && l.run_id === rec.current.run_id;
      t.appendChild(el("tr", { cls: isCur ? "current" : "" }, el("td", { text: l.method + (isCur ? " (current)" : "") }),
        el("td", { text: l.explanation || "" }), el("td", { text: l.explainer || "" }),
        el("td", {}, num(l.detection_bacc, ls("detection_bacc"))), el("td", {}, num(l.fuzzing_bacc, ls("fuzzing_bacc"))),
        el("td", {}, num(l.auroc, ls("auroc")), " [", num(l.auroc_low, ls("auroc_low")), ", ", num(l.auroc_high, ls("auroc_high")), "]"),
        el("td", {}, num(l.confidence, ls("confidence")))));
    });
    s.appendChild(t);
  }

  function shade(a, max) {
    var x = max > 0 && a > 0 ? Math.min(a / max, 1) : 0;
    return x > 0 ? "rgba(255, 120, 0, " + (0.12 + 0.88 * x).toFixed(3) + ")" : "transparent";
  }

  /* One context per line: [row_id, token_pos, act, tokens, acts, center] (quantiles: quantile first). */
  function contextsBlock(rec, title, id, list, offset) {
    var s = section(title, id);
    if (!list || !list.length) {
      s.appendChild(el("p", { cls: "none", text: "no activations: the feature does not fire on the token set" }));
      return;
    }
    var col = id === "top" ? "top_contexts" : "quantiles", o = offset || 0, lastQ = null;
    var max = rec.max_act || 0;
    list.forEach(function (c, i) {
      if (o && c[0] !== lastQ) {
        lastQ = c[0];
        s.appendChild(el("h3", { text: "quantile " + lastQ }));
      }
      var rowId = c[o], pos = c[o + 1], act = c[o + 2], toks = c[o + 3], acts = c[o + 4], centre = c[o + 5];
      var base = col + "[" + (i + 1) + "]";
      var line = el("div", { cls: "ctx", "data-row": rowId, "data-pos": pos });
      line.appendChild(el("div", { cls: "ctx-head" }, num(act, cs(base + ".act")), " \u00b7 row ",
        el("code", { text: rowId }), " \u00b7 token " + pos));
      var text = el("div", { cls: "ctx-text" });
      toks.forEach(function (t, j) {
        var a = acts[j];
        var span = el("span", {
          cls: "t" + (j === centre ? " c" : ""), style: "background:" + shade(a, max),
          title: "activation " + B.fmt(a), "data-act": B.fmt(a), "data-sql": cs(base + ".acts[" + (j + 1) + "]"),
          text: B.tok(t)
        });
        text.appendChild(span);
      });
      line.appendChild(text);
      s.appendChild(line);
    });
  }

  page.addEventListener("mouseover", function (ev) {
    var t = ev.target.closest(".t");
    if (!t) return;
    var ctx = t.closest(".ctx");
    hover.textContent = "token " + JSON.stringify(t.textContent) + " \u00b7 activation " + t.dataset.act +
      " \u00b7 row " + ctx.dataset.row;
  });
  document.addEventListener("click", function (ev) {
    var n = ev.target.closest("[data-sql]");
    if (!n) return;
    document.getElementById("sql").textContent = n.getAttribute("data-sql");
    document.getElementById("sqlbar").hidden = false;
  });
  document.getElementById("copy").addEventListener("click", function () {
    var text = document.getElementById("sql").textContent;
    if (navigator.clipboard) navigator.clipboard.writeText(text).catch(function () {});
  });
})();
