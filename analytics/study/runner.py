"""Run a study's steps in order, each through its own command's `main(argv)`, skipping what is done.

Every command of every step (analytics.study.config: one per step, or one per named variant) runs
exactly as a user would type it: its argv is built from the YAML, references to earlier results
(`attribution:mean`, `adapter: finetune`) resolved to the run ids those steps recorded. The study's
state file, `runs/study-<id>/state.json`, keeps per command the sha256 of its resolved argv, the
run ids it created (the `runs` rows that appeared while it ran) and its primary result (the adapter
of the finetune, the attribution run, the experiment's run id); a command whose argv hash matches
and whose runs are still recorded as finished is skipped without loading anything. A command
whose inputs changed (another attribution run upstream) has another argv and runs again. Commands
that are themselves resumable (extractors.run, trainers.finetune, analytics.select_experiment)
also continue a killed run where it stopped, so a rerun of a killed study is a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from analytics.study.config import COMMANDS, STEPS, StudyConfig, StudyError, _obj, argv_of, config_class, sections
from store.core import Store, write_json


class _Tee(io.TextIOBase):
    """stdout to the terminal and to a buffer (the study reads result ids from what commands print)."""

    def __init__(self, out: Any):
        self.out, self.buf = out, io.StringIO()

    def write(self, s: str) -> int:
        self.out.write(s)
        return self.buf.write(s)

    def flush(self) -> None:
        self.out.flush()


def _runs(store_root: str) -> dict[str, tuple[str, str]]:
    """run_id -> (kind, status) of every run of the store."""
    st = Store(store_root)
    if not st.has_table("runs"):
        return {}
    t = st.query("SELECT run_id, kind, status FROM runs").to_pylist()
    out: dict[str, tuple[str, str]] = {}
    for r in t:  # a run with several rank records is finished once any says so
        if out.get(r["run_id"], ("", ""))[1] != "finished":
            out[r["run_id"]] = (r["kind"], r["status"])
    return out


class Study:
    """One study on one store: its folder, state and log (module docstring)."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.id = cfg.study_id()
        self.store = Store(cfg.store)
        self.dir = self.store.run_dir(self.id)
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"commands": {}}
        )
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def log(self, line: str) -> None:
        print(f"[study {self.id}] {line}")
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "study.log", "a") as f:
            f.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {line}\n")

    def save(self) -> None:
        write_json(self.state_path, self.state)

    # ---- references to earlier results ----------------------------------------------------
    def result(self, key: str) -> str:
        entry = self.state["commands"].get(key)
        if not entry or not entry.get("result"):
            step = key.split("/")[0]
            raise StudyError(
                f"the study needs the result of {key}, which has not run in this study: add {step!r} to its "
                f"steps (or the variant {key.split('/')[1]!r} to its {step} section)"
            )
        return entry["result"]

    def resolve(self, step: str, flags: dict[str, Any]) -> dict[str, Any]:
        variants = set(self.cfg.attribution)
        out = {}
        for k, v in flags.items():
            if isinstance(v, str) and v.startswith("attribution:") and v.split(":", 1)[1] in variants:
                v = "attribution:" + self.result(f"attribution/{v.split(':', 1)[1]}")
            elif k == "attribution" and isinstance(v, str) and v in variants:
                v = self.result(f"attribution/{v}")
            elif k in ("adapter", "resume_adapter") and v == "finetune":
                v = self.result("finetune/finetune")
            out[k] = v
        return out

    # ---- one command ---------------------------------------------------------------------
    def done(self, key: str, settings: str) -> bool:
        entry = self.state["commands"].get(key)
        if not entry or entry["settings"] != settings or entry.get("status") != "finished":
            return False
        runs = _runs(self.cfg.store)
        return all(runs.get(r, ("", ""))[1] == "finished" for r in entry["runs"])

    def run_command(self, step: str, label: str, flags: dict[str, Any]) -> None:
        key = f"{step}/{label}"
        argv = argv_of(self.cfg, step, self.resolve(step, flags))
        settings = hashlib.sha256(json.dumps([COMMANDS[step].main, argv]).encode()).hexdigest()[:16]
        if self.done(key, settings):
            self.skipped.append(key)
            self.log(f"skip {key}: done with the same settings ({settings})")
            return
        module = COMMANDS[step].main.split(":")[0]
        self.log(f"run {key}: python -m {module} {' '.join(argv)}")
        before = set(_runs(self.cfg.store))
        t0 = time.perf_counter()
        tee = _Tee(sys.stdout)
        with contextlib.redirect_stdout(tee):
            rc = _obj(COMMANDS[step].main)(argv)
        seconds = time.perf_counter() - t0
        if rc:
            self.state["commands"][key] = {"settings": settings, "status": "failed", "argv": argv, "runs": []}
            self.save()
            raise StudyError(f"step {key} failed (exit {rc}): python -m {module} {' '.join(argv)}")
        after = _runs(self.cfg.store)
        new = sorted(r for r in after if r not in before)
        self.state["commands"][key] = {
            "step": step,
            "label": label,
            "settings": settings,
            "status": "finished",
            "module": module,
            "argv": argv,
            "runs": new,
            "kinds": {r: after[r][0] for r in new},
            "result": self.primary(step, new, after, tee.buf.getvalue()),
            "seconds": round(seconds, 1),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.save()
        self.ran.append(key)
        self.log(f"done {key} in {seconds:.1f} s: runs {', '.join(new) or 'none (no new runs record)'}")

    def primary(self, step: str, new: list[str], runs: dict[str, tuple[str, str]], out: str) -> str | None:
        """The result a later step refers to: the finetune's adapter, the attribution run, the
        experiment's run id (from the new runs, else from what the command printed)."""
        kinds = {"finetune": "finetune", "attribution": "attribution", "experiment": "select_experiment", "lds": "lds"}
        kind = kinds.get(step)
        ids = [r for r in new if runs[r][0] == kind] if kind else new
        if step == "finetune":
            st = Store(self.cfg.store)
            if ids:
                rows = st.query("SELECT adapter FROM adapters WHERE run_id = ?", [ids[-1]]).column(0).to_pylist()
                if rows:
                    return rows[0]
            m = re.findall(r"adapter[: ]+'?([\w.\-]+)", out)
            return m[-1] if m else None
        if ids:
            return ids[-1]
        if step == "experiment":
            m = re.findall(r"(select-[0-9a-f]{12})", out)
            return m[-1] if m else None
        if step == "lds":  # a finished run's rerun prints its id
            m = re.findall(r"\b(lds-[0-9a-f]{12})\b", out)
            return m[-1] if m else None
        if step == "attribution":
            m = re.findall(r"attribution run (\S+)", out)
            return m[-1] if m else None
        m = re.findall(r"\b(ingest-[0-9a-f]{12})\b", out) if step == "ingest" else []
        return m[-1] if m else None


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run (or skip) every enabled step in order, then the report (analytics.study.report)."""
    from analytics.study.report import write_report

    study = Study(cfg)
    study.log(f"start: steps {', '.join(s for s in STEPS if s in cfg.steps)}")
    for step in STEPS:
        if step not in cfg.steps or step == "report":
            continue
        if config_class(step) is None:
            raise StudyError(
                f"step {step}: {COMMANDS[step].main.split(':')[0]} is not installed in this checkout; drop "
                f"{step!r} from steps"
            )
        for label, flags in sections(cfg, step):
            study.run_command(step, label, flags)
    doc = None
    if "report" in cfg.steps:
        settings = hashlib.sha256(json.dumps(study.state["commands"], sort_keys=True).encode()).hexdigest()[:16]
        if study.state.get("report") == settings and (study.dir / "study.md").is_file():
            study.skipped.append("report/report")
            study.log(f"skip report: study.md is up to date ({settings})")
            doc = json.loads((study.dir / "study.json").read_text())
        else:
            doc = write_report(study)
            study.state["report"] = settings
            study.save()
            study.ran.append("report/report")
            study.log(f"report {study.dir / 'study.md'}")
    study.state["last_invocation"] = {"ran": study.ran, "skipped": study.skipped}
    study.save()
    study.log(f"end: {len(study.ran)} ran, {len(study.skipped)} skipped")
    return {"study_id": study.id, "dir": str(study.dir), "ran": study.ran, "skipped": study.skipped, "report": doc}
