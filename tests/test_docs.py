"""The docs are tied to the code: every command quoted in README.md and docs/*.md exists, and
every `--flag` quoted with it is an option of that command's parser.

Commands are `python -m MODULE [SUBCOMMAND]` (also `torchrun ... -m MODULE`) and
`activation-store NAME` (a name in analytics.cli.COMMANDS). A command's flags are the ones
that follow it on its line of a code block (up to `#`, `;`, `|`, `&&` or the next command),
or in its inline code span; a span of flags alone (`--qa strict`) belongs to the last
command of its table cell. Any other quoted flag (in prose: "`--extract-missing` runs it for
you") must be an option of some project command. A project command's options are read from its own
`--help`, run in-process (so each is the parser users get); a module outside the project
(pytest, bergson) only has to be importable. The README's commands table is
analytics.cli.COMMANDS, both forms (`commands_table()` writes it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest

from analytics.cli import COMMANDS, PROG
from analytics.glance import GLANCE_BEGIN, GLANCE_END
from store.cli import Command

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROJECT = ("store", "extractors", "trainers", "analytics", "bench", "sql")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND = re.compile(
    rf"(?:python -m|torchrun\b[^`\n]*?\s-m)\s+([a-z_][\w.]*)|\b{PROG}\s+([a-z][\w-]*(?:[ \t]+[a-z][\w-]*)*)"
)
STOP = re.compile(r"\s#|;|\||&&|>|\bpython -m\b|\btorchrun\b|\b" + PROG + r"\b")


class Quote(NamedTuple):
    where: str  # file:line
    form: str  # "python -m" or PROG
    name: str  # module (python -m) or the words after PROG
    words: tuple[str, ...]  # the plain words after the module (subcommand candidates)
    flags: tuple[str, ...]


def _segments(text: str) -> list[tuple[int, str, int]]:
    """(line, text, cell) pieces to scan: each line of a fenced code block (continuation lines
    joined), and each inline code span elsewhere; `cell` numbers the table cell a span is in
    (a flags-only span belongs to the cell's last command), None outside tables."""
    out: list[tuple[int, str, int | None]] = []
    fenced, cell, pending = False, 0, ""
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            pending += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                out.append((i, pending, None))
                pending = ""
            continue
        table = line.lstrip().startswith("|")
        for part in line.split("|") if table else [line]:
            cell += 1
            for span in re.findall(r"`([^`]+)`", part):
                out.append((i, span, cell if table else None))
    return out


def quotes(path: Path) -> tuple[list[Quote], list[tuple[str, str]]]:
    """The commands quoted in `path`, and the (where, flag) quoted apart from any command."""
    found: list[Quote] = []
    loose: list[tuple[str, str]] = []
    last: dict[int, int] = {}  # table cell -> index in found of its last command
    for line, seg, cell in _segments(path.read_text()):
        where = f"{path.relative_to(ROOT)}:{line}"
        matches = list(COMMAND.finditer(seg))
        if not matches:
            if seg.lstrip().startswith("--") and cell in last:
                q = found[last[cell]]
                found[last[cell]] = q._replace(flags=q.flags + tuple(FLAG.findall(seg)))
            else:
                loose += [(where, f) for f in FLAG.findall(seg)]
            continue
        for m in matches:
            rest = seg[m.end() :]
            stop = STOP.search(rest)
            rest = rest[: stop.start()] if stop else rest
            if m.group(1):
                words = tuple(w for w in rest.split() if re.fullmatch(r"[a-z][a-z-]*", w))
                found.append(Quote(where, "python -m", m.group(1).rstrip("."), words, tuple(FLAG.findall(rest))))
            else:
                name = m.group(2)
                found.append(Quote(where, PROG, name, tuple(name.split()), tuple(FLAG.findall(rest))))
            if cell is not None:
                last[cell] = len(found) - 1
    return found, loose


ALL = [q for p in DOCS for q in quotes(p)[0]]
LOOSE = [f for p in DOCS for f in quotes(p)[1]]
# Flags of other tools that the docs quote in prose: pip's, torchrun's, bergson's (`hessian --method`)
OTHER_TOOLS = {
    *("--no-deps", "--nproc-per-node", "--nnodes", "--node-rank", "--standalone"),
    *("--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--method"),
}


def _command(q: Quote) -> Command | None:
    """The command a quote names: the longest match of its words (subcommands included)."""
    if q.form == PROG:
        cands = [c for c in COMMANDS if tuple(c.name.split()) == q.words[: len(c.name.split())]]
        return max(cands, key=lambda c: len(c.name.split()), default=None)
    cands = [c for c in COMMANDS if c.module == q.name and c.args == q.words[: len(c.args)]]
    return max(cands, key=lambda c: len(c.args), default=None)


@cache
def options(module: str, args: tuple[str, ...] = ()) -> frozenset[str]:
    """The options a command's `--help` lists (run in-process)."""
    cmd = next((c for c in COMMANDS if c.module == module and c.args == args), None)
    main = cmd.load() if cmd else importlib.import_module(module).main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code in (0, None), f"python -m {module} {' '.join(args)} --help exited {e.value.code}"
    return frozenset(FLAG.findall(buf.getvalue()))


def test_the_docs_quote_commands():
    """The scanner finds the docs' commands (a broken pattern would pass every test below)."""
    names = {q.name for q in ALL}
    assert {"extractors.run", "trainers.sae", "store.sql", "bench.read", "trainers.steering"} <= names
    assert sum(len(q.flags) for q in ALL) > 100


@pytest.mark.parametrize("name", sorted({q.name for q in ALL if q.form == "python -m"}))
def test_every_quoted_module_exists(name):
    where = [q.where for q in ALL if q.name == name and q.form == "python -m"]
    assert importlib.util.find_spec(name) is not None, f"python -m {name} (quoted at {', '.join(where)}) is no module"


def test_every_quoted_activation_store_command_exists():
    bad = [f"{q.where}: {PROG} {q.name}" for q in ALL if q.form == PROG and _command(q) is None]
    assert not bad, "not in analytics.cli.COMMANDS:\n" + "\n".join(bad)


def test_every_quoted_flag_is_an_option_of_its_command():
    bad = []
    for q in ALL:
        if not q.flags or q.name.split(".")[0] not in PROJECT and q.form == "python -m":
            continue
        cmd = _command(q)
        module, args = (cmd.module, cmd.args) if cmd else (q.name, ())
        missing = sorted(set(q.flags) - options(module, args) - {"--help"})
        if missing:
            bad.append(f"{q.where}: {q.form} {q.name} {' '.join(args)}: {' '.join(missing)}")
    assert not bad, "flags the command does not have:\n" + "\n".join(bad)


def test_every_flag_quoted_in_prose_is_an_option_of_some_command():
    known = set().union(*(options(c.module, c.args) for c in COMMANDS), OTHER_TOOLS)
    bad = sorted({f"{where}: {flag}" for where, flag in LOOSE if flag not in known})
    assert not bad, "flags no command has:\n" + "\n".join(bad)


def test_every_quoted_source_file_exists():
    """Paths such as `trainers/sae/run.py` in the docs name files that exist (a moved module's
    old path would send a reader nowhere)."""
    path = re.compile(r"\b(?:store|extractors|trainers|analytics|bench|sql|tests)/[\w/]+\.(?:py|sql)\b")
    bad = [
        f"{p.relative_to(ROOT)}:{n}: {m}"
        for p in DOCS
        for n, line in enumerate(p.read_text().splitlines(), 1)
        for m in path.findall(line)
        if not (ROOT / m).exists()
    ]
    assert not bad, "no such file:\n" + "\n".join(bad)


def commands_table() -> str:
    """The README's table of commands, from analytics.cli.COMMANDS."""
    rows = ["| command | python -m form | what it does |", "|---|---|---|"]
    rows += [f"| `{PROG} {c.name}` | `{c.python_m}` | {c.summary} |" for c in COMMANDS]
    return "\n".join(rows)


def test_the_readme_commands_table_is_analytics_cli_commands():
    readme = (ROOT / "README.md").read_text()
    assert commands_table() in readme, (
        "README.md's commands table differs from analytics.cli.COMMANDS; paste this:\n" + commands_table()
    )


def test_the_readme_results_at_a_glance_are_the_generated_block():
    """The README's figures come from `python -m analytics.report --markdown --into README.md`:
    its block is there, and every figure in it names the run (or benchmark file) it came from."""
    text = (ROOT / "README.md").read_text()
    assert text.count(GLANCE_BEGIN) == 1 and text.count(GLANCE_END) == 1, "README.md lost its generated block"
    block = text[text.index(GLANCE_BEGIN) : text.index(GLANCE_END)]
    figures = [ln for ln in block.splitlines() if ln.startswith("- **")]
    assert figures, "the generated block has no figures: run python -m analytics.report --markdown --into README.md"
    for ln in figures:
        assert re.search(r"\(runs? `[^`]+`|\(`[^`]+\.json`", ln), f"a figure without its source: {ln}"
