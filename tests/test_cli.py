"""The command line: `--help` of every command through both of its forms, the routing of
`activation-store`, and the shared option groups (store.cli) being the one definition of the
options every command shares.

Both forms run in-process (`analytics.cli.main([...])`, and `python -m MODULE` through runpy
with sys.argv patched), so the heavy imports happen once; only the installed console script is
a subprocess.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from analytics import cli
from store.cli import SHARED_HELP, build_parser, parse_config

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {c.name: c for c in cli.COMMANDS}


def _help(run, capsys) -> str:
    """stdout of a `--help` call, which must exit 0."""
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def _check_layers(out: str, where: str) -> None:
    """A command that takes layers takes both spellings (store.cli.LayerOptions)."""
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))
    if flags & {"--layer", "--layers"}:
        assert {"--layer", "--layers"} <= flags, f"{where} takes only one of --layer / --layers"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_through_activation_store(name, capsys):
    out = _help(lambda: cli.main([*name.split(), "--help"]), capsys)
    assert out.startswith(f"usage: activation-store {name} "), out[:200]
    _check_layers(out, f"activation-store {name}")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_through_python_m(name, capsys, monkeypatch):
    c = COMMANDS[name]
    monkeypatch.setattr(sys, "argv", [c.module, *c.args, "--help"])
    with warnings.catch_warnings():
        # runpy: "'x.y' found in sys.modules ... prior to execution" (the other form imported it)
        warnings.simplefilter("ignore", RuntimeWarning)
        out = _help(lambda: runpy.run_module(c.module, run_name="__main__", alter_sys=True), capsys)
    assert out.startswith(f"usage: {c.python_m} "), out[:200]
    _check_layers(out, c.python_m)


def test_console_script_lists_every_command():
    exe = Path(sys.executable).with_name("activation-store")
    assert exe.is_file(), f"{exe} is not installed: run make setup (pip install -e '.[dev]')"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("usage: activation-store COMMAND")
    listed = {line.split("  ")[0].strip() for line in out.splitlines() if line.startswith("  ")}
    missing = [n for n in COMMANDS if not any(line.strip().startswith(n + " ") for line in out.splitlines())]
    assert not missing, f"not listed: {missing} (listed: {sorted(listed)})"


def test_unknown_command_and_no_command_exit_2(capsys):
    assert cli.main(["extrct"]) == 2
    assert "did you mean extract" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "usage: activation-store COMMAND" in capsys.readouterr().err
    assert cli.main(["steering"]) == 2  # a group without its subcommand lists the group
    assert "steering compute" in capsys.readouterr().err


def test_one_layer_command_says_so(capsys):
    for argv, what in (
        (["token-selector", "--layers", "6", "17"], "the token selector"),
        (["correlations", "--layers", "6", "17"], "feature correlations"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert f"{what} takes one layer: pass --layer L (got 6 17)" in capsys.readouterr().err


# ---- the shared option groups -------------------------------------------------------------
def _dataclass_fields(packages: list[str]):
    """(module path, class, field, its own help or None) of every field declared in a
    @dataclass class body of the packages' modules, read with ast (nothing is imported)."""
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.ClassDef):
                    continue
                if not any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                    continue
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        yield path.relative_to(ROOT), node.name, stmt.target.id, _own_help(stmt.value)


def _own_help(value: ast.expr | None) -> str | None:
    """The "help" of `field(..., metadata={"help": ...})`, or None."""
    if not (isinstance(value, ast.Call) and ast.unparse(value.func).endswith("field")):
        return None
    for kw in value.keywords:
        if kw.arg == "metadata" and isinstance(kw.value, ast.Dict):
            for k, v in zip(kw.value.keys, kw.value.values, strict=True):
                if isinstance(k, ast.Constant) and k.value == "help":
                    return ast.unparse(v)
    return None


def test_store_has_one_definition_and_one_help_text():
    own = [
        f"{path}: {cls}.store"
        for path, cls, name, help_ in _dataclass_fields(["store", "extractors", "trainers", "analytics", "bench"])
        if name == "store" and help_ is not None and not (cls == "StoreOptions" and path.as_posix() == "store/cli.py")
    ]
    assert not own, "configs that define --store with their own help (compose store.cli.StoreOptions):\n" + "\n".join(
        own
    )


def test_shared_options_are_not_redefined_in_store_trainers_analytics():
    """store/, trainers/ and analytics/ take every shared option (store, model, device, ranks,
    layers, seed, progress) from the groups: a config may give one another default, not its own help."""
    own = [
        f"{path}: {cls}.{name}"
        for path, cls, name, help_ in _dataclass_fields(["store", "trainers", "analytics"])
        if name in SHARED_HELP and help_ is not None and path.as_posix() != "store/cli.py"
    ]
    assert not own, "shared options redefined with their own help:\n" + "\n".join(own)


def test_arm_training_budget_is_defined_once(capsys):
    """The selection experiment and the LDS train their arms / subsets with one option group
    (analytics.select_budget.ArmTrainingOptions): no selection, LDS or study config redefines its
    flags with its own help, both commands list them under the group's heading, and each parses to the same Budget."""
    from analytics.lds.config import LdsConfig
    from analytics.select_budget import GROUP, ArmTrainingOptions, Budget
    from analytics.select_experiment import SelectExperimentConfig

    names = {f.name for f in dataclasses.fields(ArmTrainingOptions)}
    own = [
        f"{path}: {cls}.{name}"
        for path, cls, name, help_ in _dataclass_fields(["analytics"])
        if name in names
        and help_ is not None
        and (path.name.startswith("select_") or path.parts[1] in ("lds", "study", "selection"))
        and path.as_posix() != "analytics/select_budget.py"
    ]
    assert not own, "arm training flags redefined (inherit analytics.select_budget.ArmTrainingOptions):\n" + "\n".join(
        own
    )
    argv = ["--max-steps", "7", "--batch-size", "3", "--lr", "0.01", "--claim-timeout", "5"]
    budgets = []
    for cls in (SelectExperimentConfig, LdsConfig):
        text = build_parser(cls).format_help()
        heading = text.index(f"{GROUP}:")
        assert heading < text.index("shared options:")
        own_options, group = text[text.index("\noptions:") : heading], text[heading : text.index("shared options:")]
        flags = [f"--{n.replace('_', '-')} " for n in names]
        assert all(f in group and f not in own_options for f in flags), text
        cfg = parse_config(cls, argv)
        assert cfg.claim_timeout == 5.0
        budgets.append(cfg.budget())
    expected = Budget(epochs=1, max_steps=7, batch_size=3, grad_accum=1, lr=0.01, warmup_steps=0)
    assert budgets[0] == budgets[1] == expected
    with pytest.raises(SystemExit):
        parse_config(LdsConfig, ["--max-steps", "0"])
    assert "--max-steps must be positive, got 0" in capsys.readouterr().err
