"""`python -m analytics.study CONFIG.yaml`: run a study config (analytics.study.runner).

    python -m analytics.study configs/study_cpu.yaml        # the embedded default, ~1 h on 2 CPU cores
    python -m analytics.study configs/study_control.yaml    # the planted positive control
    python -m analytics.study configs/study_gpu.yaml        # users' scale: k 500, 5 seeds, SmolTalk
    python -m analytics.study configs/study_cpu.yaml --check   # validate the config, run nothing

A rerun of the same config skips every step whose result exists with the same settings (a resume
after a kill); the report is runs/study-<id>/study.md (+ study.json, study.png) in the store.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from analytics.study.config import StudyError, load
from store.cli import parse_config, user_errors
from store.core import StoreError


@dataclass(kw_only=True)
class StudyCommand:
    """Run the study a YAML config describes (module docstring)."""

    config: str = field(metadata={"help": "the study's YAML config (configs/study_*.yaml)", "positional": True})
    check: bool = field(default=False, metadata={"help": "only validate the config (steps, keys, budget)"})


@user_errors(StudyError, StoreError, ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    cmd = parse_config(StudyCommand, argv, prog="python -m analytics.study")
    cfg = load(cmd.config)  # every key checked before any model loads
    if cmd.check:
        print(f"{cmd.config}: valid study config ({cfg.study_id()}), steps {', '.join(cfg.steps)}")
        return 0
    from analytics.study.runner import run_study

    res = run_study(cfg)
    print(f"study {res['study_id']}: {len(res['ran'])} commands ran, {len(res['skipped'])} skipped")
    if res["report"]:
        print(f"report {res['dir']}/study.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
