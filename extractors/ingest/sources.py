"""Load SmolTalk-schema chat data from wherever it lives.

A source is one of:
* `embedded`: the deterministic sample of `extractors.ingest.sample.generate` (no network), streamed
  to temporary JSON-lines files (`SpooledRecords`) so that any size fits in memory;
* a local `.parquet`, `.jsonl`/`.json` file, or a folder of them (files named `train*` /
  `test*` give the splits; anything else counts as `train`);
* a folder written by `datasets.Dataset(Dict).save_to_disk`;
* a Hugging Face Hub id with a config, e.g. `HuggingFaceTB/smoltalk` + `smol-magpie-ultra`
  (needs the Hub to be reachable).

Every split must carry the SmolTalk columns (`REQUIRED_COLUMNS`); a missing one is an error
naming the column and the file. A value that looks like a local path (it starts with `.`,
`/` or `~`, or ends in a data-file suffix) and names nothing is reported as a missing path,
not tried on the Hub.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq

from extractors.ingest.records import UNREADABLE, read_jsonl
from extractors.ingest.sample.generate import iter_sample

REQUIRED_COLUMNS = ("messages", "category", "difficulty", "quality", "reward_model_score", "conversation_tokens")
METADATA_COLUMNS = REQUIRED_COLUMNS[1:]
EMBEDDED = "embedded"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")


class SourceError(ValueError):
    """The source cannot be found or loaded."""


class SchemaError(SourceError):
    """The source does not have the SmolTalk schema."""


class Source(NamedTuple):
    name: str
    config: str | None
    revision: str | None
    content_hash: str
    splits: dict[str, Iterable[dict[str, Any]]]  # lists, or SpooledRecords (both have len())
    origin: dict[str, str]  # split -> file or hub address, for error messages
    control: dict[str, Any] | None = None  # a planted control's settings (extractors.ingest.sample.planted)


class SpooledRecords:
    """One split's records kept in a JSON-lines file instead of memory (the embedded sample at
    any size): iterable any number of times, with a known length. The folder holding the file
    lives as long as this object."""

    def __init__(self, path: Path, n: int, owner: Any):
        self.path, self.n, self._owner = path, n, owner

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "rb") as fh:
            for line in fh:
                yield json.loads(line)


def _spool_sample(seed: int, n_train: int, n_test: int, scratch: Path | None) -> dict[str, SpooledRecords]:
    """The embedded sample streamed to JSON-lines files, one per split, in `scratch` (the
    store's scratch folder, see store.scratch; without one, a temporary folder) (the records
    round-trip exactly: str, int, float, bool and None values only)."""
    tmp = tempfile.TemporaryDirectory(prefix="embedded-sample-") if scratch is None else None
    folder = Path(tmp.name) if tmp is not None else scratch
    paths = {s: folder / f"{s}.jsonl" for s in ("train", "test")}
    counts = dict.fromkeys(paths, 0)
    files = {s: open(p, "w", encoding="utf-8") for s, p in paths.items()}
    try:
        for split, rec in iter_sample(seed=seed, n_train=n_train, n_test=n_test):
            files[split].write(json.dumps(rec) + "\n")
            counts[split] += 1
    finally:
        for f in files.values():
            f.close()
    return {s: SpooledRecords(paths[s], counts[s], tmp) for s in paths}


def _hash_records(splits: dict[str, Iterable[dict]]) -> str:
    h = hashlib.sha256()
    for split in sorted(splits):
        h.update(split.encode())
        for rec in splits[split]:
            h.update(json.dumps(rec, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def check_schema(columns: list[str] | set[str], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in set(columns)]
    if missing:
        raise SchemaError(
            f"{where}: missing column(s) {', '.join(missing)}; a SmolTalk-schema source needs "
            f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(sorted(columns)) or 'none'})"
        )


def _read_file(path: Path) -> list[dict]:
    """A file's records. A line of a JSON-lines file that cannot be read becomes a placeholder
    the ingest quarantines (extractors.ingest.records); a file unreadable as a whole is an error."""
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError, ...: the file as a whole is unreadable
            raise SourceError(
                f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:200]}); "
                "re-download or re-export it, or remove it from the source folder"
            ) from e
        check_schema(table.column_names, str(path))
        return table.to_pylist()
    if path.suffix in (".jsonl", ".json"):
        data = path.read_bytes()
        if path.suffix == ".json" and data.lstrip().startswith(b"["):
            try:
                recs = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SourceError(
                    f"{path}: not a readable JSON array ({e}); fix the file, or store one "
                    "record per line as .jsonl (unreadable lines are then quarantined)"
                ) from e
            if not all(isinstance(r, dict) for r in recs):
                raise SourceError(f"{path}: a JSON array of records must hold objects only")
        else:
            recs = read_jsonl(path, data)
        readable = [r for r in recs if UNREADABLE not in r]
        cols: set[str] = set().union(*(r.keys() for r in readable)) if readable else set()
        check_schema(cols, str(path))
        return recs
    raise SchemaError(f"{path}: unsupported file type {path.suffix!r}; use .parquet, .jsonl or .json")


def _split_of(path: Path) -> str:
    stem = path.name.lower()
    for split in ("train", "test", "validation"):
        if stem.startswith(split):
            return "test" if split == "validation" else split
    return "train"


def _from_datasets(ds: Any, where: str) -> dict[str, list[dict]]:
    from datasets import DatasetDict  # lazy: datasets takes seconds to import; only Hub sources need it

    parts = ds if isinstance(ds, DatasetDict) else {"train": ds}
    out = {}
    for split, d in parts.items():
        check_schema(d.column_names, f"{where} [{split}]")
        out["test" if split == "validation" else split] = d.to_list()
    return out


def looks_like_path(spec: str) -> bool:
    """Whether `spec` is meant as a local path rather than a Hub id like `owner/name`."""
    return spec.startswith((".", "/", "~", "\\")) or Path(spec).suffix.lower() in DATA_SUFFIXES


def _missing_path(spec: str, path: Path) -> SourceError:
    where = str(path) if str(path) == str(path.absolute()) else f"{path} (= {path.absolute()})"
    return SourceError(
        f"--source {spec!r}: no such file or folder: {where} does not exist. Check the path "
        "(a .parquet/.jsonl/.json file, a folder of them, or a save_to_disk folder), "
        "or pass a Hub id like HuggingFaceTB/smoltalk, or --source embedded for the built-in sample"
    )


def load_source(
    spec: str,
    config: str | None = None,
    revision: str | None = None,
    *,
    sample_seed: int = 0,
    sample_train: int = 1000,
    sample_test: int = 250,
    scratch: Path | None = None,
) -> Source:
    """Load every split of `spec` (see the module doc for what it may name) into memory (the
    embedded sample: spooled to files in `scratch`, which must outlive the Source)."""
    if spec == EMBEDDED:
        splits = _spool_sample(sample_seed, sample_train, sample_test, scratch)
        return Source(
            "embedded:smoltalk-sample",
            f"seed={sample_seed},train={sample_train},test={sample_test}",
            None,
            _hash_records(splits),
            splits,
            {s: f"embedded sample [{s}]" for s in splits},
        )
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            from datasets import load_from_disk  # lazy: see _from_datasets

            splits = _from_datasets(load_from_disk(str(path)), str(path))
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return Source(
                str(path.resolve()), config, revision, _hash_files(files), splits, {s: str(path) for s in splits}
            )
        files = (
            [path]
            if path.is_file()
            else sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
        )
        if not files:
            raise SchemaError(f"{path}: no .parquet, .jsonl or .json files in this folder")
        splits: dict[str, list[dict]] = {}
        origin: dict[str, str] = {}
        for f in files:
            s = _split_of(f)
            splits.setdefault(s, []).extend(_read_file(f))
            origin[s] = ", ".join(filter(None, [origin.get(s), str(f)]))
        return Source(str(path.resolve()), config, revision, _hash_files(files), splits, origin)
    if looks_like_path(spec):
        raise _missing_path(spec, path)
    if "/" not in spec:
        raise SchemaError(f"--source {spec!r} is neither 'embedded', an existing path, nor a Hub id like owner/name")
    try:
        from datasets import load_dataset  # lazy: see _from_datasets

        ds = load_dataset(spec, config, revision=revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds when offline
        raise SchemaError(
            f"could not load {spec!r} (config {config!r}) from the Hugging Face Hub: {type(e).__name__}: {e}; "
            f"nor is there a local file or folder {str(path)!r}. "
            "Offline, download its parquet files and pass --source <folder>, or use --source embedded"
        ) from e
    splits = _from_datasets(ds, f"{spec}/{config}")
    rev = revision or _dataset_version(ds)
    return Source(spec, config, rev, _hash_records(splits), splits, {s: f"{spec}/{config} [{s}]" for s in splits})


def _dataset_version(ds: Any) -> str | None:
    """The version a loaded Hub dataset's info states, recorded (informative only) when no
    --revision pins one; None when it is not a DatasetDict with a split (nothing to read it from)."""
    from datasets import DatasetDict  # lazy: see _from_datasets

    if not isinstance(ds, DatasetDict) or not ds:
        return None
    version = next(iter(ds.values())).info.version
    return version and str(version)
