"""The study's YAML config: its schema (`StudyConfig`), its checks, and the commands it becomes.

A study config names the store, the model and device every step shares, the steps to run (a subset
of `STEPS`, always run in that order) and one section per step whose keys are the flags of that
step's own command (`python -m ...`, underscores for dashes, `true`/`false` for `--x`/`--no-x`,
lists for several values). Three steps run one command per named variant: `eval_loss` (base and
adapter), `attribution` (e.g. `mean`, `nearest`) and `experiment` (one selection experiment per
name, all under one `budget`). A value `attribution:NAME` (or `attribution: NAME` for the
predictor and lds) names an attribution variant of this study and becomes that run's id.

Every key is checked against the command's config dataclass before anything runs (an unknown key
is one error naming it and the keys the command knows), and a budget key (seeds, steps, batch, lr)
inside one experiment instead of the shared `budget` is refused: every arm of every experiment
trains with the same budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from analytics.select_budget import BUDGET_FIELDS
from store.cli import ModelOptions, ProgressOptions, StoreOptions

STEPS = (
    "ingest",
    "finetune",
    "eval_loss",
    "attribution",
    "subsets",
    "hidden",
    "sae",
    "codes",
    "predictor",
    "experiment",
    "lds",
    "report",
)


class Command(NamedTuple):
    """Where a step's command lives: its `main(argv)` (what analytics.cli routes to) and its config
    dataclass (whose fields are the keys a section may use)."""

    main: str
    config: str | None  # None: the config class is found in the module (analytics.lds)
    fixed: tuple[str, ...] = ()  # flags the step always passes


COMMANDS = {
    "ingest": Command("extractors.dataset:main", "extractors.ingest.pipeline:IngestConfig"),
    "finetune": Command("trainers.finetune.train:main", "trainers.finetune.train:FinetuneConfig"),
    "eval_loss": Command("trainers.finetune.eval_loss:main", "trainers.finetune.eval_loss:EvalLossConfig"),
    "attribution": Command("extractors.run:main", "extractors.pipeline:ExtractConfig", ("--kinds", "attribution")),
    "subsets": Command("trainers.selection.subsets:main", "trainers.selection.subsets:SubsetsConfig"),
    "hidden": Command("extractors.run:main", "extractors.pipeline:ExtractConfig", ("--kinds", "hidden")),
    "sae": Command("trainers.sae.cli:main", "trainers.sae.run:SAETrainConfig"),
    "codes": Command("extractors.run:main", "extractors.pipeline:ExtractConfig", ("--kinds", "sae")),
    "predictor": Command("trainers.selection.predictor:main", "trainers.selection.predictor:PredictorConfig"),
    "experiment": Command("analytics.select_experiment:main", "analytics.select_experiment:SelectExperimentConfig"),
    "lds": Command("analytics.lds:main", None),
}
VARIANTS = ("eval_loss", "attribution", "experiment")  # sections of named variants
BUDGET = ("seeds", *BUDGET_FIELDS)  # one budget for every arm of every experiment
SHARED = tuple(f.name for g in (StoreOptions, ModelOptions, ProgressOptions) for f in dataclasses.fields(g))


class StudyError(ValueError):
    """A study config the user must fix (one message naming the value and the fix)."""


@dataclass(kw_only=True)
class StudyConfig(StoreOptions, ModelOptions, ProgressOptions):
    """The schema of a study YAML (analytics.study; see docs/selection.md). The shared options
    (store, model, device, compute_dtype, model_cache, progress) are set once and passed to every
    step's command that has them."""

    name: str = field(default="study", metadata={"help": "a label for the report"})
    steps: list[str] = field(default_factory=lambda: list(STEPS), metadata={"help": "the steps to run"})
    ingest: dict[str, Any] = field(default_factory=dict, metadata={"help": "python -m extractors.dataset flags"})
    finetune: dict[str, Any] = field(default_factory=dict, metadata={"help": "python -m trainers.finetune flags"})
    eval_loss: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"base": {}, "adapter": {"adapter": "finetune"}},
        metadata={"help": "python -m trainers.eval_loss flags per variant; adapter: finetune = the study's adapter"},
    )
    attribution: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"mean": {"score_mode": "mean"}},
        metadata={"help": "python -m extractors.run --kinds attribution flags per variant"},
    )
    subsets: dict[str, Any] = field(default_factory=dict, metadata={"help": "python -m trainers.subsets flags"})
    hidden: dict[str, Any] = field(default_factory=dict, metadata={"help": "python -m extractors.run flags"})
    sae: dict[str, Any] = field(default_factory=dict, metadata={"help": "python -m trainers.sae flags"})
    codes: dict[str, Any] = field(default_factory=dict, metadata={"help": "python -m extractors.run --kinds sae"})
    predictor: dict[str, Any] = field(default_factory=dict, metadata={"help": "python -m trainers.sae_predictor"})
    experiment: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "budget: the shared budget; runs: python -m analytics.select_experiment flags per name"},
    )
    lds: dict[str, Any] = field(default_factory=dict, metadata={"help": "python -m analytics.lds flags"})
    report: dict[str, Any] = field(default_factory=dict, metadata={"help": "no keys (the study's own report)"})

    def __post_init__(self) -> None:
        self.check_device()

    def study_id(self) -> str:
        """study-<hash of what the steps compute>: the steps list and progress bars left out, so
        disabling a step or a progress bar keeps the same study (and its state)."""
        skip = ("steps", "progress", "name", "model_cache")
        what = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return "study-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _obj(path: str) -> Any:
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


def config_class(step: str) -> type | None:
    """The step command's config dataclass (None when its module is not installed: analytics.lds)."""
    cmd = COMMANDS[step]
    if cmd.config:
        return _obj(cmd.config)
    try:
        mod = importlib.import_module(cmd.main.partition(":")[0])
    except ModuleNotFoundError:
        return None
    found = [v for k, v in vars(mod).items() if k.endswith("Config") and dataclasses.is_dataclass(v)]
    return found[0] if len(found) == 1 else None


def load(path: str | Path) -> StudyConfig:
    """Read and check a study YAML: unknown top-level keys, steps or command keys, and a budget set
    per experiment, are each one StudyError naming the value and the known ones."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise StudyError(f"study config {str(p)!r} is not a file; pass a YAML such as configs/study_cpu.yaml")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise StudyError(f"{p}: a study config is a mapping (name, store, steps, ...), got {type(raw).__name__}")
    known = [f.name for f in dataclasses.fields(StudyConfig)]
    bad = [k for k in raw if k not in known]
    if bad:
        raise StudyError(f"{p}: unknown key {bad[0]!r}; a study config knows {', '.join(known)}")
    cfg = StudyConfig(**raw)
    check(cfg, str(p))
    return cfg


def check(cfg: StudyConfig, where: str = "study config") -> None:
    bad = [s for s in cfg.steps if s not in STEPS]
    if bad:
        raise StudyError(f"{where}: unknown step {bad[0]!r}; the steps are {', '.join(STEPS)} (run in that order)")
    if len(set(cfg.steps)) != len(cfg.steps):
        raise StudyError(f"{where}: steps {cfg.steps} names a step twice; name each once")
    if cfg.report:
        raise StudyError(f"{where}: the report step takes no keys, got {sorted(cfg.report)}")
    exp = cfg.experiment or {}
    bad = [k for k in exp if k not in ("budget", "runs")]
    if bad:
        raise StudyError(f"{where}: experiment has no key {bad[0]!r}; it takes budget (shared) and runs (per name)")
    for name, flags in (exp.get("runs") or {}).items():
        own = [k for k in flags or {} if k in BUDGET]
        if own:
            raise StudyError(
                f"{where}: experiment {name!r} sets its own {own[0]} ({flags[own[0]]!r}): a budget that differs "
                f"between arms; set {', '.join(BUDGET)} once, under experiment.budget"
            )
    bad = [k for k in exp.get("budget") or {} if k not in BUDGET]
    if bad:
        raise StudyError(f"{where}: experiment.budget has no key {bad[0]!r}; it takes {', '.join(BUDGET)}")
    for step in cfg.steps:
        if step == "report":
            continue
        cls = config_class(step)
        if cls is None:
            continue  # analytics.lds not installed: the step says so when it runs
        fields = {f.name for f in dataclasses.fields(cls)}
        for label, flags in sections(cfg, step):
            bad = [k for k in flags if k.replace("-", "_") not in fields]
            if bad:
                raise StudyError(
                    f"{where}: step {step} ({label}) has no key {bad[0]!r}: {COMMANDS[step].main.split(':')[0]} "
                    f"knows {', '.join(sorted(fields - set(SHARED)))}"
                )
            own = [k for k in flags if k in SHARED]
            if own:
                raise StudyError(f"{where}: step {step} sets {own[0]!r}; set it once, at the top of the config")


def sections(cfg: StudyConfig, step: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, flags) of each command of the step, in order."""
    sec = getattr(cfg, step)
    if step == "experiment":
        budget = sec.get("budget") or {}
        return [(name, {**budget, **(flags or {})}) for name, flags in (sec.get("runs") or {}).items()]
    if step in VARIANTS:
        return [(label, dict(flags or {})) for label, flags in sec.items()]
    return [(step, dict(sec))]


def argv_of(cfg: StudyConfig, step: str, flags: dict[str, Any]) -> list[str]:
    """The command line of one command: the step's fixed flags, the shared ones its config has, then
    the section's flags (`key: value` -> `--key value`; booleans `--key` / `--no-key`)."""
    cls = config_class(step)
    fields = {f.name for f in dataclasses.fields(cls)} if cls else set(SHARED)
    argv = list(COMMANDS[step].fixed)
    # store, model, device and progress always; the other shared options only when set (a default
    # left out keeps the argv, and so the skip check, the same)
    defaults = {f.name: f.default for f in dataclasses.fields(StudyConfig)}
    always = ("store", "model", "device", "progress")
    shared = {k: getattr(cfg, k) for k in SHARED if k in always or getattr(cfg, k) != defaults[k]}
    for key, value in [*((k, v) for k, v in shared.items() if k in fields), *flags.items()]:
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv
