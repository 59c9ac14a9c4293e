"""Read datasets (``--dataset`` / ``--prompt_data``) into ``Rows`` and mix several of them.

A dataset spec is one of
- a local file: ``.json`` / ``.jsonl`` / ``.parquet`` / ``.arrow`` / ``.csv`` (it is the ``train``
  split; ask for another split of a directory instead);
- a local directory of such files, or ``TYPE@DIR`` (``json@/data/dir``) to read only files of
  that type; files are assigned to splits by name (``train.jsonl``, ``test-00000.parquet``,
  ``train/part0.json``), and a directory without split-named files is all ``train``;
- a directory written by ``datasets.Dataset.save_to_disk``;
- anything else is a HuggingFace hub name (``NAME`` or ``NAME@DATA_DIR``), when reachable.

Every file becomes its own part of the ``Rows``, so errors name the file and its row.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from engine.data.config import DataConfig
from engine.data.errors import DataError, DataWarning
from engine.data.rows import Rows

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
TYPE_NAMES = ("json", "jsonl", "parquet", "arrow", "csv")
SUPPORTED = (
    "supported: local .json/.jsonl/.parquet/.arrow/.csv files, a directory of them, TYPE@DIR "
    f"(TYPE one of {', '.join(TYPE_NAMES)}), a save_to_disk directory, or a HuggingFace hub name"
)
# Names HF also recognises as splits; a directory using any of them is split by file name.
SPLIT_NAMES = ("train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation")


def load_dataset_source(spec: str, *, split: str = "train", max_samples: int | None = None,
                        skip_bad_rows: bool = False) -> Rows:
    """The rows of split ``split`` of one dataset spec, the first ``max_samples`` of them.
    ``skip_bad_rows``: lines of a JSON-lines file that are not valid JSON are skipped and counted."""
    spec = spec.strip()
    kind, at, location = spec.partition("@")
    if at and kind.lower() in TYPE_NAMES:
        rows = _load_directory(Path(location).expanduser(), split, builders={FILE_FORMATS["." + kind.lower()]},
                               skip_bad_rows=skip_bad_rows)
    elif not at and Path(spec).expanduser().exists():
        rows = _load_local(Path(spec).expanduser(), split, skip_bad_rows=skip_bad_rows)
    elif not at and _looks_like_path(spec):
        raise DataError(f"no such file or directory; {SUPPORTED}", source=spec)
    else:
        rows = _load_hub(kind if at else spec, data_dir=location if at else None, split=split)
    return rows.head(max_samples)


def blend_datasets(config: DataConfig, *, split: str | None = None) -> Rows:
    """All ``--dataset`` sources of ``split`` (default ``--train_split``), mixed like OpenRLHF.

    Without ``--dataset_probs`` the sources are concatenated in order. With it they are
    interleaved by ``datasets.interleave_datasets`` (probabilities, ``--seed``, stopping when
    every source has been used up at least once, smaller ones cycling), so a seed gives the
    same order as OpenRLHF's ``blending_datasets``. ``--max_samples`` caps every source and
    the mixture.
    """
    split = split or config.train_split
    sources = [load_dataset_source(spec, split=split, max_samples=config.max_samples, skip_bad_rows=config.skip_bad_rows)
               for spec in config.dataset_specs]
    for spec, source in zip(config.dataset_specs, sources):
        if len(source) == 0:
            raise DataError(f"split {split!r} has no rows", source=spec)
    mixed = Rows.concat(sources)
    probabilities = config.probabilities
    if probabilities is not None and len(sources) > 1:
        mixed = mixed.take(_interleaved_order([len(s) for s in sources], probabilities, config.seed))
    return mixed.head(config.max_samples)


def _interleaved_order(lengths: list[int], probabilities: list[float], seed: int) -> np.ndarray:
    """Positions into the concatenation of sources, in HF ``interleave_datasets`` order."""
    from datasets import Dataset, interleave_datasets

    offsets = np.cumsum([0] + lengths[:-1])
    # Interleave tiny index tables instead of the data: same order, and provenance survives.
    tables = [Dataset.from_dict({"i": np.arange(n) + offset}) for n, offset in zip(lengths, offsets)]
    mixed = interleave_datasets(tables, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted")
    return np.asarray(mixed["i"], dtype=np.int64)


# ----- local files ----------------------------------------------------------------------------
def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).suffix.lower() in FILE_FORMATS


def _load_local(path: Path, split: str, *, skip_bad_rows: bool = False) -> Rows:
    if path.is_file():
        if split != "train":
            raise DataError(
                f"a single file is the 'train' split only, so it has no split {split!r}; put split-named "
                f"files ({split}.jsonl, ...) in a directory and pass the directory or TYPE@DIR",
                source=str(path),
            )
        return _load_file(path, skip_bad_rows=skip_bad_rows)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _load_saved(path, split)
    return _load_directory(path, split, builders=set(FILE_FORMATS.values()), skip_bad_rows=skip_bad_rows)


def _load_file(path: Path, *, skip_bad_rows: bool = False) -> Rows:
    """One local file as one part of ``Rows``."""
    import datasets

    builder = FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported file type {path.suffix!r}; {SUPPORTED}", source=str(path))
    if path.stat().st_size == 0:
        raise DataError("the file is empty", source=str(path))
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001 - any reader failure becomes one clear message
        failure = DataError(f"cannot read it as {builder}: {_root_cause(error)}", source=str(path))
        if builder == "json":
            return _load_json_lines(path, failure, skip_bad_rows=skip_bad_rows)
        raise failure from error
    return Rows.from_table(str(path), table)


def _load_json_lines(path: Path, failure: DataError, *, skip_bad_rows: bool) -> Rows:
    """A JSON-lines file the Arrow reader refused, read line by line: its lines that are not valid
    JSON are named (the first) and, with ``--skip_bad_rows``, skipped and counted. A file that is
    one JSON document, or whose lines all parse (the reader failed for another reason), keeps the
    reader's error."""
    text = path.read_text(errors="replace")
    if not text.lstrip().startswith("{"):
        raise failure
    rows, bad = {}, []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            bad.append((number, error.msg))
            continue
        if not isinstance(row, dict):
            bad.append((number, f"a JSON {type(row).__name__}, not an object"))
            continue
        rows[number] = row
    if not bad:
        raise failure
    first = f"line {bad[0][0] + 1} is not valid JSON: {bad[0][1]}"
    if not skip_bad_rows:
        raise DataError(f"{first} ({len(bad)} such lines; --skip_bad_rows skips them)", source=str(path))
    warnings.warn(f"{path}: skipped {len(bad)} of {len(bad) + len(rows)} lines that are not valid JSON "
                  f"(--skip_bad_rows); first: {first}", DataWarning, stacklevel=2)
    # Rows keep their line numbers (0-based), so a later error about a row names its line.
    loaded = Rows([(str(path), rows)], np.zeros(len(rows), dtype=np.int64), np.fromiter(rows, dtype=np.int64))
    loaded.num_unparsable = len(bad)
    return loaded


def _load_directory(directory: Path, split: str, *, builders: set[str], skip_bad_rows: bool = False) -> Rows:
    if not directory.is_dir():
        raise DataError(f"not a directory; {SUPPORTED}", source=str(directory))
    files = sorted(p for p in directory.rglob("*") if p.is_file() and FILE_FORMATS.get(p.suffix.lower()) in builders)
    if not files:
        kinds = ", ".join(ext for ext, builder in FILE_FORMATS.items() if builder in builders)
        raise DataError(f"the directory holds no data files ({kinds}); {SUPPORTED}", source=str(directory))
    return Rows.concat([_load_file(path, skip_bad_rows=skip_bad_rows) for path in _files_of_split(files, directory, split)])


def _files_of_split(files: list[Path], directory: Path, split: str) -> list[Path]:
    """The files named for ``split``; all files when none is named for any split."""
    names = (split.lower(), *SPLIT_NAMES)
    named = {path: _split_of(path, directory, names) for path in files}
    chosen = [path for path, name in named.items() if name == split.lower()]
    if chosen:
        return chosen
    found = sorted({name for name in named.values() if name})
    if not found and split == "train":
        return files
    raise DataError(
        f"no files for split {split!r} (files are matched by name, e.g. {split}.jsonl or {split}-00000.parquet); "
        f"splits found: {', '.join(found) or 'none'}",
        source=str(directory),
    )


def _split_of(path: Path, directory: Path, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` a file is named for: ``train.jsonl``, a shard ``train-00000-of-00002.parquet``
    (the name, a separator, a digit), or anything under ``train/``."""
    for name in (path.relative_to(directory).parts[0].lower(), path.stem.lower()):
        for split in names:
            if re.fullmatch(rf"{re.escape(split)}([-_.]\d.*)?", name):
                return split
    return None


def _load_saved(path: Path, split: str) -> Rows:
    """A directory written by ``save_to_disk`` (a Dataset: split 'train'; a DatasetDict: by name)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001
        raise DataError(f"cannot read it with datasets.load_from_disk: {_root_cause(error)}",
                        source=str(path)) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"no split {split!r}; splits: {', '.join(loaded)}", source=str(path))
        return Rows.from_table(f"{path}[{split}]", loaded[split])
    if split != "train":
        raise DataError(f"a saved Dataset is the 'train' split only, so it has no split {split!r}", source=str(path))
    return Rows.from_table(str(path), loaded)


# ----- hub ------------------------------------------------------------------------------------
def _load_hub(name: str, *, data_dir: str | None, split: str) -> Rows:
    import datasets

    try:
        table = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as error:  # noqa: BLE001
        raise DataError(
            f"not a local file or directory, and loading it from the HuggingFace hub failed "
            f"({_root_cause(error)}); {SUPPORTED}",
            source=name,
        ) from error
    return Rows.from_table(f"{name}[{split}]", table)


def _root_cause(error: BaseException) -> str:
    """The innermost cause's message: HF wraps reader errors ("JSON parse error ... in row 3")."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"
