"""Records as they come from a source, made safe to flatten: unreadable lines and loose types.

A JSON-lines file may hold a line that is not UTF-8, not JSON or not a JSON object. Such a
line becomes a placeholder record (`unreadable(...)`) that the ingest quarantines with
reason `unreadable_record` (file, line number and a repr of the raw bytes in its detail),
so one bad line never aborts an ingest and is never dropped silently.

`coerce` repairs the loose types that real dumps carry, and counts each repair (the counts
go to the manifest's `filter_stats.coerced`):

* `messages` given as a JSON string of the list instead of the list: parsed;
* numeric metadata given as text (`reward_model_score` "4.5", `conversation_tokens` "812"):
  converted; text that is no number quarantines the record (`bad_metadata`);
* categorical metadata given as numbers or booleans (`difficulty` 3): turned into text.

Roles other than system/user/assistant (`tool`, `function`, ...) are not coerced: the
flattening step quarantines them with reason `unknown_role`.
"""

from __future__ import annotations

import json
from typing import Any

UNREADABLE = "__unreadable__"
NUMERIC = {"reward_model_score": float, "conversation_tokens": int}
TEXT = ("category", "difficulty", "quality")


def unreadable(file: str, line: int, raw: bytes, why: str) -> dict[str, Any]:
    """The placeholder record of a line that could not be read."""
    return {UNREADABLE: {"file": file, "line": line, "raw": repr(raw[:300]), "error": why}}


def read_jsonl(path: Any, data: bytes) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; unreadable lines become `unreadable` placeholders."""
    recs = []
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            recs.append(unreadable(str(path), i + 1, raw, f"not UTF-8: {e.reason} at byte {e.start}"))
            continue
        except json.JSONDecodeError as e:
            recs.append(unreadable(str(path), i + 1, raw, f"not JSON: {e.msg} at column {e.colno}"))
            continue
        if not isinstance(rec, dict):
            recs.append(unreadable(str(path), i + 1, raw, f"a JSON {type(rec).__name__}, not an object"))
            continue
        recs.append(rec)
    return recs


def coerce(rec: dict[str, Any]) -> tuple[dict[str, Any], list[str], tuple[str, str] | None]:
    """(the record with loose types repaired, the fields repaired, or a quarantine (reason, detail))."""
    if UNREADABLE in rec:
        u = rec[UNREADABLE]
        return rec, [], ("unreadable_record", f"{u['file']}:{u['line']}: {u['error']}; raw {u['raw']}")
    fixed: list[str] = []
    out = dict(rec)
    msgs = out.get("messages")
    if isinstance(msgs, str):
        try:
            parsed = json.loads(msgs)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            out["messages"] = parsed
            fixed.append("messages_from_json_string")
    for col, kind in NUMERIC.items():
        v = out.get(col)
        if isinstance(v, str) or isinstance(v, bool):
            try:
                out[col] = kind(float(v)) if kind is int else kind(v)
            except ValueError:
                return out, fixed, ("bad_metadata", f"{col} is {v!r}, not a number")
            fixed.append(f"{col}_to_{kind.__name__}")
        elif kind is int and isinstance(v, float) and v.is_integer():
            out[col] = int(v)
            fixed.append(f"{col}_to_int")
    for col in TEXT:
        v = out.get(col)
        if v is not None and not isinstance(v, str):
            if isinstance(v, (int, float, bool)):
                out[col] = str(v)
                fixed.append(f"{col}_to_str")
            else:
                return out, fixed, ("bad_metadata", f"{col} is a {type(v).__name__}, not text")
    return out, fixed, None
