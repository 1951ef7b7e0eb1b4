"""Job validation: every error names the file and the key, and `validate` exits non-zero."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import DEMO, mpcfl, write_job
from mpcfl.jobs.schema import load_job
from mpcfl.errors import ConfigError


def demo() -> dict[str, Any]:
    return yaml.safe_load(DEMO.read_text())


def write(tmp_path: Path, spec: Any) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec) if not isinstance(spec, str) else spec)
    return path


def test_demo_job_is_valid_and_paths_resolve_against_the_job_file() -> None:
    job = load_job(DEMO)
    assert job.party_names == ["hospital_a", "hospital_b"]
    assert job.world_size == 2
    assert job.parties[0].data.train.is_file()
    assert job.outputs.dir == (DEMO.parent / "../runs/breast_cancer_lr").resolve()
    assert job.ranks("all") == [0, 1] and job.ranks(["hospital_b"]) == [1] and job.ranks("none") == []


def edit(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(demo())
    node = spec
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    # keep data paths valid from tmp_path
    for party in spec["parties"]:
        for key in ("train", "test"):
            if key in party["data"] and not str(party["data"][key]).startswith("/"):
                party["data"][key] = str((DEMO.parent / party["data"][key]).resolve())
    return spec


_DELETE = object()

CASES = [
    ("training.epoch", 3, "training.epoch: unknown key"),
    ("training.epochs", "ten", "training.epochs: Input should be a valid integer"),
    ("training.epochs", 0, "training.epochs: Input should be greater than 0"),
    ("training.learning_rate", -1, "training.learning_rate"),
    ("model.type", "svm", "model.type"),
    ("model.hidden", [8], "logistic_regression has no hidden layers"),
    ("partition", "diagonal", "partition"),
    ("parties.1.name", "hospital_a", "duplicate party name 'hospital_a'"),
    ("parties.1.name", "dealer", "party name 'dealer' is reserved for the triple dealer's process"),
    ("parties.0.nickname", "a", "parties.0.nickname: unknown key"),
    ("labels.party", "hospital_c", "labels.party: 'hospital_c' is not a party"),
    ("labels.party", _DELETE, "labels.party: a vertical job names the party"),
    ("outputs.model_to", ["nobody"], "outputs.model_to: 'nobody' is not a party"),
    ("runtime.timeout_s", 0, "runtime.timeout_s"),
    ("runtime.insecure_dealer", True, "runtime.insecure_dealer was replaced by runtime.provider: tfp"),
    ("runtime.provider", "he", "runtime.provider: unknown provider 'he' (known: tfp, ttp)"),
    ("training.loss", "cross_entropy", "two classes train with 'bce'"),
    ("training.sigmoid", "tanh", "training.sigmoid: unknown sigmoid 'tanh'; choose one of crypten, piecewise, poly"),
    ("parties.1.data.test", _DELETE, "give test data for every party or for none"),
]


@pytest.mark.parametrize(("path", "value", "message"), CASES, ids=[c[0] + "-" + c[2][:20] for c in CASES])
def test_invalid_jobs_name_the_file_and_key(tmp_path: Path, path: str, value: Any, message: str) -> None:
    job = write(tmp_path, edit(path, value))
    with pytest.raises(ConfigError) as caught:
        load_job(job)
    text = str(caught.value)
    assert text.startswith(str(job)), text
    assert message in text
    assert "\n" not in text


def test_sigmoid_choice_is_part_of_the_job_and_binary_only(tmp_path: Path) -> None:
    cheap = load_job(write(tmp_path, edit("training.sigmoid", "piecewise")))
    assert cheap.training.sigmoid == "piecewise" and load_job(DEMO).training.sigmoid == "crypten"
    assert cheap.fingerprint() != load_job(DEMO).fingerprint()  # every party must run the same one
    spec = edit("training.sigmoid", "poly")
    spec["model"]["num_classes"] = 3
    spec["training"]["loss"] = "cross_entropy"
    with pytest.raises(ConfigError, match=r"job.yaml: .*training.sigmoid: more than two classes train with a softmax"):
        load_job(write(tmp_path, spec))


def test_one_party_is_not_a_multi_party_job(tmp_path: Path) -> None:
    spec = edit("labels.party", "hospital_a")
    spec["parties"] = spec["parties"][:1]
    with pytest.raises(ConfigError, match="parties: List should have at least 2 items"):
        load_job(write(tmp_path, spec))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed", "malformed YAML"),
        ("- just\n- a list\n", "a job file is a YAML mapping"),
        ("", "a job file is a YAML mapping"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_job(write(tmp_path, text))


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    good = mpcfl("validate", str(DEMO), "--party", "hospital_b", timeout=60)
    assert good.returncode == 0, good.stderr
    assert "valid job 'breast-cancer-lr'" in good.stdout
    assert "hospital_b: 456 training rows, 10 feature columns" in good.stdout
    bad = mpcfl("validate", str(write(tmp_path, edit("training.epoch", 3))), timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0
    assert "training.epoch: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_max_abs_beyond_what_fixed_point_holds_is_refused(tmp_path: Path) -> None:
    job = write(tmp_path, edit("data.max_abs", 1e300))
    with pytest.raises(ConfigError) as caught:
        load_job(job)
    text = str(caught.value)
    assert text.startswith(f"{job}: data.max_abs: 1e+300 is beyond 32768 (2^15)"), text
    assert "\n" not in text
    assert load_job(write(tmp_path, edit("data.max_abs", 32768))).data.max_abs == 32768


INFERENCE_DEMO = DEMO.parent / "digits_inference.yaml"


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("os:system", "model.factory: os:system: calling it with no arguments failed: TypeError"),
        ("{tmp}/factories.py:answer", "model.factory: {tmp}/factories.py:answer: returned int, not a torch.nn.Module"),
    ],
    ids=["os-system", "returns-int"],
)
def test_validate_refuses_factories_that_do_not_build_a_module(tmp_path: Path, factory: str, message: str) -> None:
    (tmp_path / "factories.py").write_text("def answer():\n    return 42\n")
    spec = yaml.safe_load(INFERENCE_DEMO.read_text())
    spec["model"]["factory"] = factory.format(tmp=tmp_path)
    spec["model"]["weights"] = str((INFERENCE_DEMO.parent / spec["model"]["weights"]).resolve())
    spec["inputs"]["file"] = str((INFERENCE_DEMO.parent / spec["inputs"]["file"]).resolve())
    done = mpcfl("validate", str(write(tmp_path, spec)), timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert message.format(tmp=tmp_path) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("path", sorted((DEMO.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_is_valid(path: Path) -> None:
    assert load_job(path).name


CNN_DEMO = DEMO.parent / "digits_cnn.yaml"


def cnn_demo(tmp_path: Path, **model: Any) -> Path:
    spec = yaml.safe_load(CNN_DEMO.read_text())
    if model.get("num_classes") == 2:
        spec["training"]["loss"] = "bce"
    for party in spec["parties"]:
        party["data"] = {k: str((CNN_DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    where, _, function = spec["model"]["factory"].rpartition(":")
    spec["model"]["factory"] = f"{(CNN_DEMO.parent / where).resolve()}:{function}"
    spec["model"].update(model)
    return write(tmp_path, spec)


@pytest.mark.parametrize(
    ("model", "dp", "message"),
    [
        ({"factory": "{tmp}/factories.py:answer"}, None, "model.factory: {tmp}/factories.py:answer: returned int, not a torch.nn.Module"),
        ({"hidden": [4]}, None, "model.hidden: unknown key"),
        ({}, {"epsilon": 1.0, "delta": 1e-5}, "dp: DP-SGD trains the logistic_regression, linear_regression and mlp model types; a model.factory module cannot train with dp (drop dp, or use model.type: mlp)"),
    ],
    ids=["not-a-module", "spec-key", "dp"],
)
def test_training_factory_errors_name_the_key(tmp_path: Path, model: dict[str, Any], dp: Any, message: str) -> None:
    (tmp_path / "factories.py").write_text("def answer():\n    return 42\n")
    path = cnn_demo(tmp_path, **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in model.items()})
    if dp is not None:
        spec = yaml.safe_load(path.read_text())
        spec.update(dp=dp, outputs={**spec["outputs"], "metrics_to": "none"})
        path = write(tmp_path, spec)
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert str(caught.value) == f"{path}: {message.format(tmp=tmp_path)}"


def test_factory_model_must_fit_the_data_and_the_head(tmp_path: Path) -> None:
    """Checked before anything is shared (the parties know the feature count, all the same)."""
    from mpcfl.models.spec import FactoryModelSpec
    from mpcfl.tasks.train.bounds import check_model

    job = load_job(cnn_demo(tmp_path))
    assert isinstance(job.model, FactoryModelSpec) and job.model.num_classes == 10
    check_model(job, 64)
    with pytest.raises(ConfigError) as caught:
        check_model(job, 30)
    assert str(caught.value).startswith(
        f"{job.source}: model.factory: {job.model.factory} does not take rows of 30 features, the data's feature columns"
    )
    two = load_job(cnn_demo(tmp_path, num_classes=2))
    with pytest.raises(ConfigError, match=r"model.num_classes: 2 classes need 1 output\(s\) per row, but .* gives \(2, 10\)"):
        check_model(two, 64)


def test_a_factory_counts_in_the_fingerprint_by_its_code_not_its_folder(tmp_path: Path) -> None:
    """Parties sign the fingerprint: the same factory file in two hosts' folders must agree, and a
    party running other code under the same path must not."""
    code = "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(30, 1))\n"
    prints = []
    for host, text in (("a", code), ("b", code), ("c", code.replace("30, 1", "30, 1, bias=False"))):
        folder = tmp_path / host
        folder.mkdir()
        (folder / "net.py").write_text(text)
        prints.append(load_job(write(folder, edit("model", {"factory": "net.py:make"}))).fingerprint())
    assert prints[0] == prints[1] != prints[2]


def test_validate_names_a_missing_file_and_checks_any_task_at_a_party(tmp_path: Path) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    spec["parties"][0]["data"]["test"] = str(tmp_path / "gone.csv")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = mpcfl("validate", str(path), timeout=60)  # it was "valid" with a data file that does not exist
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"mpcfl: error: {path}: parties.0.data.test (party hospital_a): {tmp_path / 'gone.csv'}: No such file or directory; on a "
        "multi-host job, validate each party on its own host with --party NAME"
    )
    assert mpcfl("validate", str(path), "--party", "hospital_b", timeout=60).returncode == 0  # not its file
    inference = mpcfl("validate", str(INFERENCE_DEMO), "--party", "clinic", timeout=60)
    assert inference.returncode == 0, inference.stderr
    assert "clinic: inputs of shape (197, 64) fit the model" in inference.stdout
    federated = mpcfl("validate", str(DEMO.parent / "breast_cancer_fed.yaml"), "--party", "hospital_a", timeout=60)
    assert federated.returncode == 0, federated.stderr
    assert "hospital_a: " in federated.stdout and "training rows" in federated.stdout


def test_a_section_of_the_wrong_kind_is_named_not_a_traceback(tmp_path: Path) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    spec["parties"] = 3
    with pytest.raises(ConfigError, match=r"parties: Input should be a valid list"):
        load_job(write_job(tmp_path, spec))
