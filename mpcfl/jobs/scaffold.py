"""``mpcfl init``: a commented job file written from the parties' CSV files.

Only the header row of each file is read: which columns a party holds decides who holds the
label (vertical) or whether the parties agree on their columns (horizontal). The text is checked
with :func:`~mpcfl.jobs.schema.load_job` before it is put in place, and an existing file is never
overwritten.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from pathlib import Path

from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import NAME_PATTERN, load_job

_NAME = re.compile(NAME_PATTERN)
_SHOWN_COLUMNS = 8  # a comment listing a file's columns stops after this many


def party_files(items: list[str], flag: str) -> dict[str, Path]:
    """``NAME=FILE`` items of ``flag``, in order.

    Raises:
        ConfigError: an item is not NAME=FILE, a name is not a valid party name, or repeats.
    """
    files: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag}: {item!r} is not NAME=FILE")
        if not _NAME.match(name):
            raise ConfigError(f"{flag}: {name!r} is not a party name (a letter, then letters, digits, _ or -)")
        if name in files:
            raise ConfigError(f"{flag}: party {name} is given twice")
        files[name] = Path(path)
    return files


def read_header(path: Path, flag: str) -> list[str]:
    """The column names in the first row of a CSV file.

    Raises:
        ConfigError: naming the flag and the file: it cannot be read, is empty, or its header is not
            a row of distinct, non-empty names.
    """
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{flag}: {path}: cannot read it: {getattr(err, 'strerror', None) or err}") from None
    if not header:
        raise ConfigError(f"{flag}: {path}: empty file; a CSV file with a header row of column names is needed")
    header = [name.strip() for name in header]
    if any(not name for name in header):
        raise ConfigError(f"{flag}: {path}: the header has an empty column name (column {header.index('') + 1})")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ConfigError(f"{flag}: {path}: column {repeated[0]!r} appears twice in the header")
    if all(_is_number(name) for name in header):
        raise ConfigError(f"{flag}: {path}: the first row is numbers, not column names; add a header row")
    return header


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def job_name(given: str | None, out: Path) -> str:
    """``given`` (``--name``), checked, or a name made from the output file's: ``my job.yaml`` -> ``my-job``.

    Raises:
        ConfigError: ``given`` is not a valid job name.
    """
    if given is not None:
        if not _NAME.match(given):
            raise ConfigError(f"--name: {given!r} is not a job name (a letter, then up to 63 letters, digits, _ or -)")
        return given
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", out.stem).strip("-")[:64]
    return name if _NAME.match(name) else f"job-{name}"[:64].rstrip("-")


def _columns_comment(header: list[str]) -> str:
    shown = ", ".join(header[:_SHOWN_COLUMNS])
    more = len(header) - _SHOWN_COLUMNS
    return f"columns: {shown}" + (f" and {more} more" if more > 0 else "")


def _path(path: Path, folder: Path) -> str:
    """``path`` as the job file writes it: relative to the job file's folder, as the schema resolves it."""
    return os.path.relpath(path.resolve(), folder.resolve())


def render(
    *,
    name: str,
    train: dict[str, Path],
    test: dict[str, Path],
    label: str,
    partition: str,
    task: str,
    id_column: str | None,
    folder: Path,
) -> str:
    """The commented YAML of a job over ``train`` (and ``test``) files, each party's by name.

    Raises:
        ConfigError: naming the flag and file: the label column is missing (or, vertical, at more
            than one party), horizontal parties' columns differ, vertical parties share a column other
            than ``id_column``, or a test file's columns are not its training file's.
    """
    headers = {party: read_header(path, f"--party {party}") for party, path in train.items()}
    for party, path in test.items():
        if party not in train:
            raise ConfigError(f"--test {party}: not a party given with --party ({', '.join(train)})")
        if read_header(path, f"--test {party}") != headers[party]:
            raise ConfigError(f"--test {party}: {path}: its columns differ from its training file {train[party]}")
    if test and set(test) != set(train):
        missing = ", ".join(party for party in train if party not in test)
        raise ConfigError(f"--test: give a test file for every party or for none (missing: {missing})")
    holders = [party for party, header in headers.items() if label in header]
    if not holders:
        raise ConfigError(f"--label: no party's file has a column {label!r} ({'; '.join(f'{p}: {train[p]}' for p in train)})")
    if partition == "vertical":
        if len(holders) > 1:
            raise ConfigError(f"--label: column {label!r} is in {' and '.join(holders)}'s files; in a vertical job one party holds the labels")
        if id_column is not None:
            lacking = [party for party, header in headers.items() if id_column not in header]
            if lacking:
                raise ConfigError(f"--id-column: {train[lacking[0]]} ({lacking[0]}) has no column {id_column!r}")
        seen: dict[str, str] = {}
        for party, header in headers.items():
            for column in header:
                if column != id_column and column in seen:
                    raise ConfigError(
                        f"--party {party}: {train[party]}: column {column!r} is also {seen[column]}'s; in a vertical "
                        "job each party holds its own columns (a shared column of row IDs: --id-column)"
                    )
                seen.setdefault(column, party)
    else:
        if id_column is not None:
            raise ConfigError("--id-column: only a vertical job lines up rows by ID")
        first = next(iter(headers))
        for party, header in headers.items():
            if header != headers[first]:
                raise ConfigError(
                    f"--party {party}: {train[party]}: its columns differ from {first}'s ({train[first]}); in a "
                    "horizontal job every party's file has the same columns"
                )
    if task == "federated" and partition != "horizontal":
        raise ConfigError("--task federated: federated training needs --partition horizontal (each party holds whole rows)")

    lines = [
        f"# Written by `mpcfl init`: {'federated' if task == 'federated' else 'secure'} training over {len(train)} parties' CSV files,",
        "# " + ("each party holding some columns of the same rows (a vertical partition)." if partition == "vertical"
                else "each party holding whole rows with the same columns (a horizontal partition)."),
        "# Paths are relative to this file. Check it: `mpcfl validate FILE` (with --party NAME, that party's",
        f"# files too); run it: `mpcfl run FILE`. Every key and its meaning: `mpcfl schema --task {task}`.",
        f"name: {name}",
        f"task: {task}",
    ]
    if task == "train":
        lines.append(f"partition: {partition}")
    lines.append("parties:")
    for party, path in train.items():
        lines += [f"  - name: {party}", "    data:", f"      train: {_path(path, folder)}  # {_columns_comment(headers[party])}"]
        if party in test:
            lines.append(f"      test: {_path(test[party], folder)}")
    lines.append("labels:")
    if partition == "vertical":
        lines.append(f"  party: {holders[0]}  # the one party whose file has the label column")
    lines += [
        f"  column: {label}",
        "  # classes: [no, yes]  # the label's values in class order, if they are names rather than 0, 1, ...",
        "data:",
        "  standardize: true  # each column centred and scaled by its statistics over all parties, computed under MPC",
    ]
    if id_column is not None:
        lines.append(f"  id_column: {id_column}  # rows are lined up by private set intersection on this column")
    elif partition == "vertical":
        lines.append("  # id_column: ID  # without it, row i of every party's file is the same record")
    lines += [
        "model:",
        "  type: logistic_regression  # or mlp, with hidden: [16]; num_classes: N for more than two classes",
    ]
    if task == "train":
        lines += [
            "training:",
            "  epochs: 10",
            "  batch_size: 32",
            "  learning_rate: 0.1",
            "outputs:",
            f"  # dir: runs/{name}  # the default: beside this file, a folder per party",
            f"  model_to: [{holders[0]}]  # who receives the trained model (none: nobody)",
            "  metrics_to: all  # who receives the per-epoch metrics",
        ]
    else:
        lines += [
            "federated:",
            "  rounds: 10",
            "  local_epochs: 1",
            "  batch_size: 32",
            "  lr: 0.1",
            "  strategy: fedavg  # or {name: fedprox, mu: 0.01}, {name: fedavgm, momentum: 0.9}, {name: fedadam, server_lr: 0.01}",
            "outputs:",
            f"  # dir: runs/{name}  # the default: beside this file, a folder per party",
            "  model_to: all  # who writes model.pt (every party can compute it from the rounds' averages)",
        ]
    lines += ["runtime:", "  timeout_s: 60  # how long a party waits for a silent peer before the job stops", ""]
    return "\n".join(lines)


def write_new(out: Path, text: str) -> None:
    """Writes ``text`` to ``out`` only if it is a valid job, and never over an existing file.

    Raises:
        ConfigError: ``out`` exists, or the text does not validate (naming ``out``).
    """
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out: {out} exists; mpcfl init never overwrites a file (choose another name or remove it)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: {out.parent} is not a folder")
    # Validated under a temporary name in the same folder (relative paths resolve alike), then linked
    # into place: link fails rather than replace a file that appeared meanwhile.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            load_job(tmp)
        except ConfigError as err:
            raise ConfigError(str(err).replace(tmp, str(out))) from None
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise ConfigError(f"--out: {out} exists; mpcfl init never overwrites a file") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
