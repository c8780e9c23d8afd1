"""Ingest a SmolTalk-schema dataset into the store's catalog.

    python -m extractors.dataset                              # the embedded sample -> ./store_data
    python -m extractors.dataset --source HuggingFaceTB/smoltalk --config smol-magpie-ultra
    python -m extractors.dataset --source ./smoltalk_parquet/ --train-base 2000 --store /data/st
    python -m extractors.dataset --control planted [--plant-fraction 0.1] [--seed S] --store /tmp/ctl
                                        # the planted positive control (extractors.ingest.sample.planted)

`python -m extractors.run` ingests with these defaults when the store has no rows.
Afterwards: `duckdb store_data/catalog.duckdb "SELECT split, count(*) FROM rows GROUP BY 1"`.
The library code is in `extractors.ingest`; this module only parses and calls it.
"""

from __future__ import annotations

import sys

from extractors.ingest.pipeline import IngestConfig, run_ingest, summary
from store.cli import parse_config, user_errors
from store.core import Store


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(IngestConfig, argv, prog="python -m extractors.dataset")
    result = run_ingest(cfg)
    print(summary(result))
    print(f'catalog: {Store(cfg.store).sql_command} "SELECT split, count(*) FROM rows GROUP BY 1"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
