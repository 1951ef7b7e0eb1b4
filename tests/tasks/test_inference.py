"""Secure inference on real processes: jobs, party scripts, the one-call API, and bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, assert_no_leftovers, assert_only_failed_runs, mpcfl, party_lines, write_job
from mpcfl.errors import MpcflError
from mpcfl.models.zoo import digits_mlp

DATA = REPO / "examples" / "data" / "digits_inference"
DEMO = REPO / "configs" / "digits_inference.yaml"


def plaintext(inputs: np.ndarray) -> torch.Tensor:
    model = digits_mlp()
    model.load_state_dict(torch.load(DATA / "bank_weights.pt", weights_only=True))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(inputs))


def job(tmp_path: Path, **changes: Any) -> Path:
    spec = yaml.safe_load(DEMO.read_text())
    spec["model"]["weights"] = str(DATA / "bank_weights.pt")
    spec["inputs"]["file"] = str(DATA / "clinic_inputs.npy")
    spec["outputs"]["dir"] = str(tmp_path / "out")
    for key, value in changes.items():
        section, _, field = key.partition("__")
        spec[section][field] = value
    return write_job(tmp_path, spec)


def test_job_predictions_match_plaintext_and_reach_only_the_data_owner(tmp_path: Path) -> None:
    path = job(tmp_path)
    done = mpcfl("run", str(path), timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert_no_leftovers(str(path))
    out = tmp_path / "out"
    predictions = np.load(out / "clinic" / "latest" / "predictions.npy")
    expected = plaintext(np.load(DATA / "clinic_inputs.npy")).numpy()
    assert predictions.shape == (197, 10)
    assert np.abs(predictions - expected).max() < 1e-2
    assert (predictions.argmax(1) == expected.argmax(1)).all()
    # The model owner holds no prediction: not in its folder, its metrics or its log lines.
    files = sorted(p.name for p in (out / "bank" / "latest").iterdir() if not p.name.startswith("."))  # .lock
    assert files == ["metrics.json", "openings.jsonl", "run.json"]
    bank = json.loads((out / "bank" / "latest" / "metrics.json").read_text())
    assert "predictions" not in bank
    assert [r for r in bank["reveals"] if r["what"] == "predictions"] == [
        {"what": "predictions", "shape": [197, 10], "to": [1], "epsilon_after": None, "outside_dp": False}
    ]
    bank_log = "\n".join(line for line in done.stdout.splitlines() if line.startswith("[bank]"))
    for value in expected[:5].ravel():
        assert f"{value:.3f}" not in bank_log


def _served(done: Any) -> int:
    """The dealer's count of requests served, from its closing log line."""
    found = re.search(r"ended the session after (\d+) requests", done.stdout + done.stderr)
    assert found, (done.stdout + done.stderr)[-2000:]
    return int(found.group(1))


def test_prefetch_fetches_each_repeated_batch_in_one_dealer_request_and_weights_are_opened_once(tmp_path: Path) -> None:
    # 197 rows in batches of 64: shapes 64, 64, 64, 5. Each shape's first batch is recorded (r single
    # requests: the same architecture, so the same r for both shapes), each later one is one request.
    # With mask reuse, each weight matrix's mask is registered first and released last, in a request of its own.
    runs = {}
    for prefetch, reuse in ((True, True), (False, False)):
        path = job(tmp_path / str(prefetch), runtime__prefetch=prefetch, runtime__mask_reuse=reuse)
        done = mpcfl("run", str(path), timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        metrics = json.loads((tmp_path / str(prefetch) / "out" / "bank" / "latest" / "metrics.json").read_text())
        runs[prefetch] = (_served(done), np.load(tmp_path / str(prefetch) / "out" / "clinic" / "latest" / "predictions.npy"),
                          done.stdout.count("[dealer] INFO mpcfl.mpc.providers.ttp.requests: dealer: keeps a fixed mask"),
                          metrics["communication"]["bytes"])
    per_batch = runs[False][0] // 4
    assert runs[False][0] == 4 * per_batch and per_batch > 2 and runs[False][2] == 0
    masks = len([m for m in digits_mlp().modules() if isinstance(m, torch.nn.Linear)])
    assert runs[True][2] == masks
    assert runs[True][0] == 2 * masks + 2 * per_batch + 2  # each mask registered before the batches, released after
    # The weights go out once, not once per batch: a weight element opened costs each party 8 bytes sent.
    weights = sum(m.weight.numel() for m in digits_mlp().modules() if isinstance(m, torch.nn.Linear))
    assert runs[False][3] - runs[True][3] >= 3 * weights * 8, (runs[False][3], runs[True][3], weights)
    assert np.abs(runs[True][1] - runs[False][1]).max() < 1e-2


def test_calls_in_a_session_fix_the_weights_afresh_or_once_when_served_and_are_prefetched() -> None:
    lines = party_lines("serve_twice_party.py", 2, "serve twice party")
    parsed = {}
    for rank, line in lines.items():
        found = re.fullmatch(r"kept=\[0, 0, 0, 2, 2, 0\] moved=\[(\d+), (\d+), (\d+), (\d+), (\d+)\] error=(\S+) "
                             r"stats=\{'batches': 13, 'served': \d+\} swapped=(\S+)", line)
        # Each secure_predict call's two masks were released: the dealer keeps none between calls;
        # mpcfl.serve keeps them for its calls and releases them on leaving. Batches 2 and 3 of the
        # first call and all three of the second come from one recording (the same bindings: 5
        # fetches); the call without mask reuse records its own kind of batch and fetches 2; the
        # served calls fix under the same bindings again (no mask is kept before them): 6 fetches.
        assert found, line
        parsed[rank] = [int(found.group(i)) for i in range(1, 6)]
    # p1 talks to p0 alone (p0's figures include the dealer's answers, fewer once prefetched). The
    # calls with fixed masks move the same bytes, and each batch after the first leaves out the
    # weights (12 x 16 + 16 x 3 elements, each sent and received as 8 bytes: CrypTen's count); a
    # served call after the first leaves them out of its first batch too. With fixed masks p0
    # multiplies with its own weights (one-sided products), so p1 sends its part of each product's
    # activations (9 rows of 12 and of 16) and receives none of p0's. A call that releases its
    # masks ends with one agreement round (a few bytes) that the served calls leave to the server's end.
    fixed, again, ordinary, served, served_again = parsed["1"]
    weights, activations, release = (12 * 16 + 16 * 3) * 16, 9 * (12 + 16) * 8, fixed - served
    assert fixed == again and 0 < release <= 64, parsed
    assert ordinary - served == 2 * weights + activations and served - served_again == weights, parsed
    assert float(re.search(r"error=(\S+)", lines["1"]).group(1)) < 1e-2, lines["1"]
    assert float(re.search(r"swapped=(\S+)", lines["0"]).group(1)) < 1e-2, lines["0"]  # the model owner at rank 1


def test_party_script_through_mpcfl_launch() -> None:
    done = mpcfl("launch", "--parties", "bank,clinic", str(REPO / "examples" / "secure_inference_party.py"), timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[clinic] clinic: 197 predictions, accuracy 0.9188" in done.stdout
    assert "[bank] bank: done; predictions went to the clinic only (received: None)" in done.stdout
    assert_no_leftovers("secure_inference_party.py")


def test_one_call_local_api_matches_plaintext() -> None:
    import mpcfl as api

    inputs = np.load(DATA / "clinic_inputs.npy")[:40]
    model = digits_mlp()
    model.load_state_dict(torch.load(DATA / "bank_weights.pt", weights_only=True))
    secure = api.secure_predict_local(model, inputs, batch_size=16, timeout_s=30)  # numpy, as a notebook has it
    expected = plaintext(inputs)
    assert secure.shape == expected.shape
    assert (secure - expected).abs().max() < 1e-2


def test_one_call_refuses_an_unsupported_model_before_starting_anything() -> None:
    import mpcfl as api

    model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.ELU())
    with pytest.raises(api.UnsupportedModelError, match=r"layer '1' \(ELU\) is not supported"):
        api.secure_predict_local(model, torch.zeros(2, 64))
    with pytest.raises(MpcflError, match="inputs contain NaN"):
        api.secure_predict_local(digits_mlp(), torch.full((2, 64), float("nan")))


def test_wrong_input_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "narrow.npy", np.zeros((5, 63), dtype=np.float32))
    path = job(tmp_path, inputs__file=str(tmp_path / "narrow.npy"))
    done = mpcfl("run", str(path), timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "party clinic's inputs of shape (5, 63) do not fit the model" in last
    assert not (tmp_path / "out" / "clinic" / "latest" / "predictions.npy").exists()
    assert_no_leftovers(str(path))


def test_missing_weights_file(tmp_path: Path) -> None:
    path = job(tmp_path, model__weights=str(tmp_path / "nope.pt"))
    done = mpcfl("run", str(path), timeout=120)
    assert done.returncode == 1
    assert f"mpcfl: error: bank failed: party bank: {tmp_path / 'nope.pt'}: weights file not found" in done.stderr
    assert_only_failed_runs(tmp_path / "out")


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path) -> None:
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).state_dict(),
               tmp_path / "other.pt")
    path = job(tmp_path, model__weights=str(tmp_path / "other.pt"))
    done = mpcfl("run", str(path), timeout=120)
    assert done.returncode == 1
    assert "other.pt: weights do not fit the model: size mismatch for 0.weight" in done.stderr
    assert_only_failed_runs(tmp_path / "out")


def test_inference_job_schema_errors(tmp_path: Path) -> None:
    path = job(tmp_path, inputs__owner="bank")
    done = mpcfl("validate", str(path), timeout=60)
    assert done.returncode == 1
    assert "inputs.owner: the data owner and the model owner must be different parties" in done.stderr
    path = job(tmp_path, model__factory="mpcfl.models.zoo:no_such_model")
    done = mpcfl("run", str(path), timeout=120)
    assert done.returncode == 1
    assert "model.factory: 'mpcfl.models.zoo' has no function 'no_such_model'" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    done = mpcfl("launch", "--parties", "bank,clinic", "--device", "cuda",
                 str(REPO / "examples" / "secure_inference_party.py"), timeout=120)
    assert done.returncode == 1
    assert "device is cuda but torch sees no GPU" in done.stderr


class _Shared(Exception):
    """Raised in place of sharing the model: the checks before it are what these tests pin."""


def _checks_only(monkeypatch: pytest.MonkeyPatch, rank: int, peer: list[int]) -> list[list[int]]:
    """secure_predict in this process as party ``rank`` of (bank, clinic), with the peer answering
    every exchange with ``peer`` (truncated to the width); returns what this party sent, in order."""
    from types import SimpleNamespace

    from mpcfl.mpc import session
    from mpcfl.tasks import inference

    parties = ("bank", "clinic")
    me = SimpleNamespace(name=parties[rank], rank=rank, device="cpu",
                         session=SimpleNamespace(parties=parties, rank_of=parties.index))
    sent: list[list[int]] = []

    def gather(values: list[int]) -> list[list[int]]:
        sent.append(list(values))
        rows = [peer[: len(values)], list(values)]
        return rows if rank == 1 else rows[::-1]

    def shared(*_: Any, **__: Any) -> None:
        raise _Shared

    monkeypatch.setattr(inference, "current_party", lambda: me)
    monkeypatch.setattr(session, "all_gather_public", gather)
    monkeypatch.setattr(inference, "encrypt_model", shared)
    return sent


def test_checks_and_the_shape_exchange_take_two_rounds_before_sharing(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpcfl.models.convert import trace
    from mpcfl.tasks.inference import _architecture, secure_predict

    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())
    fp = _architecture(trace(model))
    # The data owner: its shape and the architecture's fingerprint ride on the checks' agreement
    # flag; then the dry run's flag.
    sent = _checks_only(monkeypatch, 1, peer=[1] * 10 + [fp, 1, 1, 0])
    with pytest.raises(_Shared):
        secure_predict(model, torch.zeros(3, 4), model_owner="bank", data_owner="clinic")
    # ..., fingerprint, prefetch wanted, mask reuse wanted, serving many calls (mpcfl.serve)
    assert sent == [[1, 2, 3, 4, 0, 0, 0, 0, 0, 0, fp, 1, 1, 0], [1]]
    # The model owner learns the shape from the data owner's row of that same round.
    sent = _checks_only(monkeypatch, 0, peer=[1, 2, 3, 4, 0, 0, 0, 0, 0, 0, fp, 1, 1, 0])
    with pytest.raises(_Shared):
        secure_predict(model, None, model_owner="bank", data_owner="clinic", prefetch=False, mask_reuse=False)
    assert sent == [[1] + [0] * 9 + [fp, 0, 0, 0], [1]]
    sent = _checks_only(monkeypatch, 0, peer=[1, 2, 3, 5, 0, 0, 0, 0, 0, 0, fp, 1, 1, 0])
    with pytest.raises(MpcflError, match=r"party clinic's inputs of shape \(3, 5\) do not fit the model"):
        secure_predict(model, None, model_owner="bank", data_owner="clinic")
    # A peer serving many calls where this party makes one: refused in the same round, naming it.
    sent = _checks_only(monkeypatch, 0, peer=[1, 2, 3, 4, 0, 0, 0, 0, 0, 0, fp, 1, 1, 1])
    with pytest.raises(MpcflError, match=r"clinic serve the model for many calls \(mpcfl.serve\)"):
        secure_predict(model, None, model_owner="bank", data_owner="clinic")
    assert len(sent) == 1
    # A peer that failed its checks stops everyone after the first round.
    sent = _checks_only(monkeypatch, 0, peer=[0] * 14)
    with pytest.raises(MpcflError, match="party clinic failed during input and model checks"):
        secure_predict(model, None, model_owner="bank", data_owner="clinic")
    assert len(sent) == 1


def test_the_architecture_fingerprint_changes_with_the_code_and_the_shapes() -> None:
    from mpcfl.models.convert import trace
    from mpcfl.tasks.inference import _architecture

    base = _architecture(trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())))
    assert base == _architecture(trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())))  # weights aside
    assert base != _architecture(trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())))
    assert base != _architecture(trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Sigmoid())))
    # The model owner's options that shape no request stay out of it (the peers could search them).
    conv = lambda stride=1, eps=1e-5, p=0.5: trace(torch.nn.Sequential(  # noqa: E731
        torch.nn.Conv2d(1, 2, 3, stride=stride), torch.nn.BatchNorm2d(2, eps=eps), torch.nn.Dropout(p)))
    assert _architecture(conv()) == _architecture(conv(eps=1e-3, p=0.3))
    assert _architecture(conv()) != _architecture(conv(stride=2))


@pytest.mark.parametrize(
    ("bad", "message"),
    [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (-float("inf"), "NaN or infinite"),
     (2e4, "reach 2e[+]04, beyond 10000"), (-2e4, "reach 2e[+]04, beyond 10000")],
)
def test_input_checks_catch_non_finite_and_out_of_range_values_anywhere(bad: float, message: str) -> None:
    from mpcfl.tasks.inference import check_inputs

    inputs = torch.rand(4, 1, 3, 3)
    assert torch.equal(check_inputs(inputs, "here"), inputs)
    inputs[2, 0, 1, 2] = bad
    with pytest.raises(MpcflError, match=f"here: inputs .*{message}"):
        check_inputs(inputs, "here")


def test_token_ids_of_a_bert_sized_vocabulary_pass_the_checks_other_inputs_keep_the_bound() -> None:
    """Ids are shared one-hot, so fixed point does not bound them: BERT's 30,522 ids were refused as overflow."""
    from torch import nn

    from mpcfl.models.convert import encode_inputs, trace
    from mpcfl.tasks.inference import MAX_ABS_INPUT, check_inputs, input_bound

    gm = trace(nn.Sequential(nn.Embedding(30522, 4), nn.Linear(4, 2)))
    ids = torch.tensor([[0.0, 30521.0, 101.0]])
    assert input_bound(gm) == float("inf")
    assert encode_inputs(gm, check_inputs(ids, "here", input_bound(gm))).shape == (1, 3, 30522)
    with pytest.raises(MpcflError, match="NaN or infinite"):
        check_inputs(torch.tensor([[float("inf")]]), "here", input_bound(gm))
    assert input_bound(trace(nn.Sequential(nn.Linear(4, 2)))) == MAX_ABS_INPUT


def test_inputs_that_hold_no_values_are_refused_by_name() -> None:
    from mpcfl.tasks.inference import check_inputs

    with pytest.raises(MpcflError, match=r"^here: inputs of shape \(5, 0\) hold no values$"):
        check_inputs(torch.zeros(5, 0), "here")


def test_parties_with_different_architectures_are_refused_naming_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two parties that built different models got a warning, then pages of dealer tracebacks."""
    from mpcfl.models.convert import trace
    from mpcfl.tasks import inference

    mine = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    theirs = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU(), torch.nn.Linear(2, 3))
    other = inference._architecture(trace(theirs))
    _checks_only(monkeypatch, 1, peer=[1] + [0] * 9 + [other, 1])  # the agreement flag, no shape (the model owner)
    layers = inference._layers(trace(theirs))
    owner_row = [len(layers), *(d for _, _, d in layers), *([0] * (inference._MAX_LAYERS - len(layers)))]
    monkeypatch.setattr(inference, "all_gather_public", lambda row: [owner_row, row])
    with pytest.raises(MpcflError, match=r"party clinic: its model's architecture differs from model owner bank's at layer 3 \(2: Linear\)"):
        inference.secure_predict(mine, torch.zeros(3, 4), model_owner="bank", data_owner="clinic")


def test_one_call_names_inputs_that_do_not_fit_before_starting_anything() -> None:
    import mpcfl as api

    with pytest.raises(MpcflError, match=r"secure_predict_local: the caller's inputs of shape \(2, 63\) do not fit the model"):
        api.secure_predict_local(digits_mlp(), torch.zeros(2, 63))
