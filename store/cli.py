"""Config dataclasses become command lines.

Every entry point has one config dataclass; each field carries its help text in
`field(metadata={"help": ...})`, which becomes `--help`, and the parsed config is saved
with the run. Supported field types: bool, int, float, str, Literal[...] (choices),
Optional[...] and list[int | float | str]. `metadata["aliases"]` adds spellings
(`--layer` for `--layers`), `metadata["positional"]` makes a field positional.
`@user_errors(...)` on a `main()` turns the errors a user can fix into `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


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
    """An argparse parser whose options are `cls`'s fields, with their help and defaults."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = _default_of(f)
        kw: dict[str, Any] = {"help": help_of(f), "dest": f.name}
        names = ["--" + f.name.replace("_", "-")] + list(f.metadata.get("aliases", ()))
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
        # A help text that already says its default (e.g. "default 600 for ...") gets no second one.
        says_default = "default" in kw["help"].lower()
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
            if default is not None and tp is not bool and not says_default:
                kw["help"] += f" (default: {default})"
        if optional and default is None and not says_default:
            kw["help"] += " (default: none)"
        if f.metadata.get("positional"):
            kw.pop("dest")
            kw.pop("required", None)
            if default is not dataclasses.MISSING:
                kw["nargs"] = "?"
            parser.add_argument(f.name, **kw)
        else:
            parser.add_argument(*names, **kw)
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Parse `argv` into a `cls` instance; a bad value exits with argparse's message."""
    parser = build_parser(cls, prog=prog)
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
