/* The feature browser's shared helpers (index.html, feature.html): escaping, number format, the SQL
   that reads a number back from the store, and lazy <script> loading (file:// refuses fetch()). */
"use strict";
var Browse = (function () {
  var ENT = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  /* Text for innerHTML: every token string may hold <, &, quotes. */
  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, function (c) { return ENT[c]; });
  }

  /* A number with 4 significant digits; null / NaN as a dash. */
  function fmt(x) {
    if (x == null || typeof x !== "number" || isNaN(x)) return "\u2013";
    if (Number.isInteger(x)) return String(x);
    return String(Number(x.toPrecision(4)));
  }

  /* A token as shown: newlines and tabs made visible, the rest kept (spaces too). */
  function tok(t) {
    return String(t == null ? "" : t).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }

  function sqlStr(s) {
    return "'" + String(s).replace(/'/g, "''") + "'";
  }

  /* SELECT <expr> of one feature's card (the row of run `run`). */
  function cardSql(meta, run, f, expr) {
    return "SELECT " + expr + " FROM feature_cards WHERE sae = " + sqlStr(meta.sae) + " AND layer = " +
      meta.layer + " AND run_id = " + sqlStr(run) + " AND feature = " + f;
  }

  /* SELECT <expr> of one label row (a run's method for the feature). */
  function labelSql(meta, f, label, expr) {
    return "SELECT " + expr + " FROM feature_labels WHERE sae = " + sqlStr(meta.sae) + " AND layer = " +
      meta.layer + " AND feature = " + f + " AND run_id = " + sqlStr(label.run_id) + " AND method = " +
      sqlStr(label.method);
  }

  /* Add a <script src> (works from file:// and any static server); onload runs after it ran. */
  function loadScript(src, onload, onerror) {
    var s = document.createElement("script");
    s.src = src;
    s.onload = onload;
    s.onerror = onerror;
    document.head.appendChild(s);
  }

  function pad4(n) {
    var s = String(n);
    while (s.length < 4) s = "0" + s;
    return s;
  }

  return { esc: esc, fmt: fmt, tok: tok, sqlStr: sqlStr, cardSql: cardSql, labelSql: labelSql,
           loadScript: loadScript, pad4: pad4 };
})();
