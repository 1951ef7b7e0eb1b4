"""The CLI that helps itself: --version, `init`, `schema`, every validation error, outputs.dir's default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEMO, REPO, write_csv
from mpcfl import cli
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import load_job

CONFIGS = REPO / "configs"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"mpcfl {version('mpcfl')}"


def test_the_committed_schema_is_what_mpcfl_schema_prints(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "schema")
    assert code == 0
    assert (CONFIGS / "schema.json").read_text() == out, "configs/schema.json is stale: `mpcfl schema > configs/schema.json`"
    for config in sorted(CONFIGS.glob("*.yaml")):
        assert config.read_text().splitlines()[0] == "# yaml-language-server: $schema=schema.json", config


def test_schema_of_one_task_lists_its_keys_and_not_the_programs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "schema", "--task", "train")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "TrainJob"
    assert {"name", "parties", "labels", "training", "outputs"} <= set(schema["properties"])
    assert not {"source", "run_id"} & set(schema["properties"])  # load_job refuses them in a file
    assert "outputs" not in schema["required"]
    assert "dir" not in schema["$defs"]["OutputSpec"].get("required", [])
    code, _, err = run_cli(capsys, "schema", "--task", "nope")
    assert code == 1 and err.strip() == "mpcfl: error: --task: unknown task 'nope' (tasks: train, inference, federated, predict)"


def test_every_validation_error_is_listed_each_with_its_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    spec["training"]["epochs"] = 0
    spec["training"]["batch_sise"] = 8
    spec["model"]["typo"] = 1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert str(caught.value).splitlines() == [
        f"{path}: model.typo: unknown key (did you mean type?)",
        f"{path}: training.epochs: Input should be greater than 0",
        f"{path}: training.batch_sise: unknown key (did you mean batch_size?)",
    ]
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 1
    assert err.splitlines() == [f"mpcfl: error: {line}" for line in str(caught.value).splitlines()]
    assert "more error" not in err


@pytest.mark.parametrize("outputs", [None, {"model_to": ["hospital_b"]}], ids=["no-outputs", "no-dir"])
def test_outputs_dir_defaults_to_runs_job_name_beside_the_job_file(tmp_path: Path, outputs: dict | None) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    for party in spec["parties"]:
        party["data"] = {key: str((DEMO.parent / value).resolve()) for key, value in party["data"].items()}
    spec.pop("outputs")
    if outputs is not None:
        spec["outputs"] = outputs
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = load_job(path)
    assert job.outputs.dir == tmp_path / "jobs" / "runs" / "breast-cancer-lr"
    assert job.party_root("hospital_a") == tmp_path / "jobs" / "runs" / "breast-cancer-lr" / "hospital_a"


def csv_files(folder: Path) -> dict[str, Path]:
    rows = [[1.0, 2.0, 0], [3.0, 4.0, 1]]
    return {
        "a": write_csv(folder / "a.csv", ["x1", "x2"], [r[:2] for r in rows]),
        "b": write_csv(folder / "b.csv", ["x3", "label"], [[r[0] * 2, r[2]] for r in rows]),
        "h1": write_csv(folder / "h1.csv", ["x1", "x2", "label"], rows),
        "h2": write_csv(folder / "h2.csv", ["x1", "x2", "label"], rows),
    }


def test_init_writes_a_commented_job_that_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = csv_files(tmp_path / "data")
    out = tmp_path / "study.yaml"
    code, stdout, err = run_cli(
        capsys, "init", "--party", f"clinic={files['a']}", "--party", f"lab={files['b']}", "--label", "label",
        "--partition", "vertical", "--out", str(out),
    )
    assert code == 0, err
    assert stdout.strip() == f"wrote {out} (job study, 2 parties, vertical); check it with `mpcfl validate {out}`"
    text = out.read_text()
    assert text.startswith("# Written by `mpcfl init`")
    assert "train: data/a.csv  # columns: x1, x2" in text  # relative to the job file
    job = load_job(out)
    assert job.name == "study" and job.party_names == ["clinic", "lab"]
    assert job.labels.party == "lab" and job.labels.column == "label" and job.partition == "vertical"
    assert job.outputs.model_to == ["lab"] and job.outputs.dir == tmp_path / "runs" / "study"
    code, stdout, _ = run_cli(capsys, "validate", str(out))
    assert code == 0 and "valid job 'study'" in stdout


def test_init_writes_a_federated_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = csv_files(tmp_path)
    out = tmp_path / "fed.yaml"
    code, _, err = run_cli(
        capsys, "init", "--party", f"p0={files['h1']}", "--party", f"p1={files['h2']}", "--label", "label",
        "--partition", "horizontal", "--task", "federated", "--out", str(out), "--name", "my-fed",
    )
    assert code == 0, err
    job = load_job(out)
    assert job.name == "my-fed" and job.partition == "horizontal" and job.summary.startswith("federated")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--party", "p0=h1", "--party", "p1=h2", "--label", "nope", "--partition", "horizontal"],
         "--label: no party's file has a column 'nope'"),
        (["--party", "p0=a", "--party", "p1=h1", "--label", "label", "--partition", "vertical"],
         "--party p1: {h1}: column 'x1' is also p0's"),
        (["--party", "p0=h1", "--party", "p1=b", "--label", "label", "--partition", "horizontal"],
         "--party p1: {b}: its columns differ from p0's"),
        (["--party", "p0=h1", "--party", "p1=h2", "--label", "label", "--partition", "vertical"],
         "--label: column 'label' is in p0 and p1's files"),
        (["--party", "p0=h1", "--party", "p1=missing", "--label", "label", "--partition", "horizontal"],
         "--party p1: {missing}: cannot read it: No such file or directory"),
        (["--party", "p0=h1", "--label", "label", "--partition", "horizontal"], "--party: give at least two parties"),
        (["--party", "p0=h1", "--party", "p0=h2", "--label", "label", "--partition", "horizontal"],
         "--party: party p0 is given twice"),
        (["--party", "p0", "--party", "p1=h2", "--label", "label", "--partition", "horizontal"],
         "--party: 'p0' is not NAME=FILE"),
        (["--party", "p0=a", "--party", "p1=b", "--label", "label", "--partition", "vertical", "--task", "federated"],
         "--task federated: federated training needs --partition horizontal"),
        (["--party", "p0=h1", "--party", "p1=h2", "--label", "label", "--partition", "horizontal", "--name", "9lives"],
         "--name: '9lives' is not a job name"),
        (["--party", "p0=h1", "--party", "p1=h2", "--test", "p0=h1", "--label", "label", "--partition", "horizontal"],
         "--test: give a test file for every party or for none (missing: p1)"),
    ],
)
def test_init_refuses_bad_input_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    files = {**csv_files(tmp_path), "missing": tmp_path / "missing.csv"}
    expand = [a.split("=")[0] + "=" + str(files[a.split("=")[1]]) if "=" in a else a for a in args]
    out = tmp_path / "job.yaml"
    code, _, err = run_cli(capsys, "init", *expand, "--out", str(out))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("mpcfl: error: ")
    assert message.format(**files) in err
    assert not out.exists() and not list(tmp_path.glob(".job.yaml.*"))


def test_init_never_overwrites_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = csv_files(tmp_path)
    out = tmp_path / "job.yaml"
    out.write_text("mine\n")
    code, _, err = run_cli(capsys, "init", "--party", f"p0={files['h1']}", "--party", f"p1={files['h2']}", "--label",
                           "label", "--partition", "horizontal", "--out", str(out))
    assert code == 1 and f"--out: {out} exists" in err
    assert out.read_text() == "mine\n"


def test_a_header_of_numbers_is_no_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = write_csv(tmp_path / "bare.csv", ["1.0", "2.0", "0"], [[3.0, 4.0, 1]])
    files = csv_files(tmp_path)
    code, _, err = run_cli(capsys, "init", "--party", f"p0={bare}", "--party", f"p1={files['h2']}", "--label", "label",
                           "--partition", "horizontal", "--out", str(tmp_path / "job.yaml"))
    assert code == 1 and f"--party p0: {bare}: the first row is numbers, not column names" in err


def test_make_demo_ends_telling_how_to_put_mpcfl_on_path() -> None:
    import os
    import subprocess

    # Under `make test` (CI) the outer make's variables would make this one print its directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("echo ") and "source .venv/bin/activate" in last and ".venv/bin/mpcfl" in last


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    """`mpcfl schema | head` printed a BrokenPipeError traceback (a new user's trial): a pipe with no reader left."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before mpcfl writes: its first write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "mpcfl", "schema"], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_misspelt_required_key_is_one_error_naming_the_key_meant(tmp_path: Path) -> None:
    """A new user's `partiton:` gave "partition: Field required" first, then "partiton: unknown key"."""
    spec = yaml.safe_load(DEMO.read_text())
    spec["partiton"] = spec.pop("partition")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert str(caught.value) == f"{path}: partiton: unknown key (did you mean partition?)"


def test_a_value_where_a_section_goes_names_the_sections_keys_not_a_class(tmp_path: Path) -> None:
    """A new user's `center: 3.0` got "Input should be a valid dictionary or instance of DPCenterSpec"."""
    spec = yaml.safe_load(DEMO.read_text())
    spec["training"] = 3
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert str(caught.value).startswith(f"{path}: training: expected a section of keys (batch_size, ")
    assert str(caught.value).endswith("), got 3") and "Spec" not in str(caught.value)


def test_a_misspelt_optional_key_names_the_key_meant_in_its_own_section(tmp_path: Path) -> None:
    """Found by a new user: only a missing required key was suggested; `training.epoch` and
    `outputs.models_to` (both keys with defaults) got a bare "unknown key", and a whole-job check's
    line started "(top level): labels.party: ..."."""
    spec = yaml.safe_load(DEMO.read_text())
    spec["training"]["epoch"] = spec["training"].pop("epochs")
    spec["outputs"]["models_to"] = spec["outputs"].pop("model_to")
    spec["outputs"]["xyz"] = 1  # nothing close: no suggestion
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert sorted(str(caught.value).splitlines()) == [
        f"{path}: outputs.models_to: unknown key (did you mean model_to?)",
        f"{path}: outputs.xyz: unknown key",
        f"{path}: training.epoch: unknown key (did you mean epochs?)",
    ]
    spec = yaml.safe_load(DEMO.read_text())
    spec["labels"]["party"] = "hospital_c"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: labels.party: 'hospital_c' is not a party of this job"):
        load_job(path)


def test_validate_with_every_file_here_runs_each_party_s_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a new user: `mpcfl validate` said "valid" for a wrong label column and a file a row
    short, which only the run refused. With every file here it loads each party's as its process would."""
    spec = yaml.safe_load(DEMO.read_text())
    for party in spec["parties"]:
        party["data"] = {key: str((DEMO.parent / value).resolve()) for key, value in party["data"].items()}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, _ = run_cli(capsys, "validate", str(path))
    assert code == 0 and "hospital_a: 456 training rows, 20 feature columns" in out
    assert "hospital_b: 456 training rows, 10 feature columns" in out and f"{path}: valid job" in out
    wrong = {**spec, "labels": {**spec["labels"], "column": "diagnosis"}}
    path.write_text(yaml.safe_dump(wrong))
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 1 and "party hospital_b: " in err and "no label column 'diagnosis'" in err, err
    train = Path(spec["parties"][0]["data"]["train"])
    short = tmp_path / "short.csv"
    short.write_text("\n".join(train.read_text().splitlines()[:-1]) + "\n")
    spec["parties"][0]["data"]["train"] = str(short)
    path.write_text(yaml.safe_dump(spec))
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 1, err
    assert "party hospital_b: its train file has 456 rows, party hospital_a has 455; a vertical partition needs" in err
