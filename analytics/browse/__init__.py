"""The feature browser: a static site of an SAE's feature cards and labels (analytics.browse.command).

    python -m analytics.browse --sae latest --out site/

`data` reads the cards and labels from the store, `site` writes the pages and the data as
script files, `assets/` holds the HTML/CSS/JS (ours, no external network).
"""
