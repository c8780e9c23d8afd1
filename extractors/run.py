"""Extract hidden states (and SAE codes) into the store: the `python -m extractors.run` command.

    python -m extractors.run --layer 17                  # embedded model + data -> ./store_data
    python -m extractors.run --layers 6 17 24            # three layers, one forward pass
    python -m extractors.run --layer 17 --split eval --max-rows 50 --store /tmp/st   # CPU-sized
    python -m extractors.run --layer 17 --kinds sae --sae latest   # codes of the newest layer-17 SAE
    torchrun --nproc-per-node 4 -m extractors.run --layer 17   # each rank a disjoint set of units

The options are extractors.pipeline.ExtractConfig's fields; the work is
extractors.pipeline.run_extraction.
"""

from __future__ import annotations

import sys
import time

from extractors.pipeline import ExtractConfig, run_extraction
from store.cli import parse_config, user_errors


@user_errors(ValueError, RuntimeError, OSError)  # OSError: e.g. a full disk (the run is recorded failed)
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    run_extraction(parse_config(ExtractConfig, argv, prog="python -m extractors.run"))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
