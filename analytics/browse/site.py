"""The static site on disk: our HTML/CSS/JS (assets/) and the data as `<script>` files.

    site/index.html           every feature: search, sort (assets/index.js)
    site/feature.html?f=ID    one feature's page (assets/feature.js)
    site/data/index.js        window.BROWSE_INDEX = {meta, columns, rows}   (loaded by index.html)
    site/data/site.js         window.BROWSE_SITE = meta                     (loaded by feature.html)
    site/features/NNNN.js     window.BROWSE_SHARDS[NNNN] = {feature: page record, ...}

Chromium refuses fetch() of local files, so every piece of data is a script that sets a global:
a page loads its shard by adding a <script> tag, which works from file:// and from any static
server (`python -m http.server`). The JSON is written ASCII-only (\\uXXXX escapes), so no
server's or file's encoding can garble a token; all text reaches the page through textContent
or an escaping function, never as markup.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

ASSETS = ("index.html", "feature.html", "browse.css", "common.js", "index.js", "feature.js")


def shard_name(shard: int) -> str:
    return f"{shard:04d}.js"


def _script(var: str, obj: Any) -> str:
    return f"{var} = {json.dumps(obj, separators=(',', ':'), ensure_ascii=True)};\n"


def prepare(out: Path) -> None:
    """The output folder, created; shards of an earlier build are removed (a smaller SAE or
    another shard size must not leave stale pages behind)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    fdir = out / "features"
    fdir.mkdir(exist_ok=True)
    for p in fdir.glob("*.js"):
        if re.fullmatch(r"\d{4,}\.js", p.name):  # ours only: NNNN.js
            p.unlink()


def write_assets(out: Path) -> None:
    src = resources.files("analytics.browse") / "assets"
    for name in ASSETS:
        with resources.as_file(src / name) as p:
            shutil.copyfile(p, out / name)


def write_index(out: Path, meta: dict[str, Any], columns: list[str], rows: list[list[Any]]) -> Path:
    path = out / "data" / "index.js"
    path.write_text(_script("window.BROWSE_INDEX", {"meta": meta, "columns": columns, "rows": rows}))
    (out / "data" / "site.js").write_text(_script("window.BROWSE_SITE", meta))
    return path


def write_shard(out: Path, shard: int, records: dict[int, dict[str, Any]]) -> Path:
    path = out / "features" / shard_name(shard)
    body = json.dumps({str(f): r for f, r in records.items()}, separators=(",", ":"), ensure_ascii=True)
    path.write_text(f"(window.BROWSE_SHARDS = window.BROWSE_SHARDS || {{}})[{shard}] = {body};\n")
    return path
