"""Each adaptation in mpcfl.mpc.compat, tested so that a regression fails here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SCRIPTS, assert_no_leftovers, base_job, mpcfl, vertical_parties, write_job
from mpcfl.launch.local import free_port
from mpcfl.mpc import compat as _compat
from mpcfl.mpc.engine import import_crypten


def test_crypten_imports_on_current_torch() -> None:
    # Without the alias, `import crypten` fails on torch >= 2.9 (the registration module moved).
    code = "from mpcfl.mpc.engine import import_crypten; c = import_crypten(); print(c.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == _compat.CRYPTEN_VERSION


def test_a_plain_import_crypten_after_import_mpcfl_is_the_patched_one() -> None:
    # `import mpcfl` installs a finder (mpcfl.mpc.on_import), not the import: no torch until crypten is imported.
    code = """
import sys
import mpcfl
assert "torch" not in sys.modules and "crypten" not in sys.modules
import crypten
import crypten.communicator
from mpcfl.mpc import compat
assert compat._state["crypten"] is crypten and not compat._state["stock"]
assert getattr(crypten.common.rng.generate_random_ring_element, "_mpcfl_patched", False)
assert crypten.__spec__.origin.endswith("crypten/__init__.py")
print(crypten.__version__)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == _compat.CRYPTEN_VERSION


def test_a_failed_patch_leaves_no_unpatched_crypten_behind() -> None:
    # A crypten left half patched in sys.modules would be what the next plain `import crypten` gets.
    code = """
import sys
import mpcfl
from mpcfl.mpc import compat
real = compat._open_point_to_point
def broken(crypten):
    raise RuntimeError("patch failed")
compat._open_point_to_point = broken
try:
    import crypten
except RuntimeError:
    pass
assert not [n for n in sys.modules if n == "crypten" or n.startswith("crypten.")], "a half-patched crypten stayed"
compat._open_point_to_point = real
import crypten
assert compat._state["crypten"] is crypten
assert getattr(crypten.common.rng.generate_random_ring_element, "_mpcfl_patched", False)
print("patched")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "patched"


def test_registration_alias_points_at_the_moved_module() -> None:
    import_crypten().nn.onnx_converter._OPSET_VERSION  # noqa: B018 (crypten's converter imports it: loaded on first use)
    from torch.onnx._internal.torchscript_exporter import registration

    assert sys.modules["torch.onnx._internal.registration"] is registration


def test_from_pytorch_uses_the_legacy_exporter() -> None:
    crypten = import_crypten()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    converted = crypten.nn.from_pytorch(model, torch.zeros(1, 4))
    converted.eval()
    x = torch.randn(5, 4)
    # An unencrypted crypten model evaluates in plaintext, so this needs no parties.
    with torch.no_grad():
        assert torch.allclose(converted(x), model(x), atol=1e-5)


def test_crypten_groups_get_the_job_timeout() -> None:
    crypten = import_crypten()
    dist_view = crypten.communicator.distributed_communicator.dist
    assert isinstance(dist_view, _compat._DistWithTimeout)
    seen: dict[str, object] = {}

    class Recorder:
        def init_process_group(self, *args: object, **kwargs: object) -> None:
            seen["init"] = kwargs["timeout"]

        def new_group(self, *args: object, **kwargs: object) -> None:
            seen["group"] = kwargs["timeout"]

    original, dist_view._dist = dist_view._dist, Recorder()
    try:
        _compat.set_process_group_timeout(7)
        dist_view.init_process_group(backend="gloo")
        dist_view.new_group([0])
    finally:
        dist_view._dist = original
        _compat.set_process_group_timeout(60)
    assert seen["init"].total_seconds() == 7 and seen["group"].total_seconds() == 7
    # Only crypten's reference is wrapped: torch itself is untouched.
    import torch.distributed

    assert not isinstance(torch.distributed, _compat._DistWithTimeout)


def test_a_party_without_peers_gives_up_at_the_job_timeout(tmp_path: Path) -> None:
    parties = vertical_parties(tmp_path, [["mean_radius"], ["mean_texture"]], label_party=1)
    job = write_job(tmp_path, base_job(parties=parties, labels={"party": "p1", "column": "malignant"},
                                       runtime={"timeout_s": 3}))
    started = time.monotonic()
    # A free port: a fixed one may be another run's rendezvous, which this party would then join.
    done = mpcfl("party", str(job), "--party", "p0", "--rendezvous", f"tcp://127.0.0.1:{free_port()}", timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert elapsed < 30, f"took {elapsed:.0f}s: the 3 s job timeout did not apply"
    assert "mpcfl: error: party p0" in done.stderr


@pytest.mark.parametrize("name", ["configs", "examples", "benchmarks", "test"])
def test_our_folders_never_shadow_crypten_top_level_packages(name: str) -> None:
    assert not (REPO / name / "__init__.py").exists()
    offenders = [p for p in (REPO / "mpcfl").rglob("*.py") if f"from {name}" in p.read_text() or f"import {name}\n" in p.read_text()]
    assert offenders == []


def test_init_runs_the_hook_after_the_group_forms_and_before_any_seed_exchange() -> None:
    from types import SimpleNamespace

    calls: list[str] = []
    communicator = SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 2)
    fake = SimpleNamespace(
        comm=SimpleNamespace(_init=lambda **kwargs: calls.append("group"), get=lambda: communicator),
        mpc=SimpleNamespace(
            ttp_required=lambda: True,
            provider=SimpleNamespace(ttp_provider=SimpleNamespace(TTPClient=SimpleNamespace(_init=lambda: calls.append("dealer seed")))),
        ),
        _setup_prng=lambda: calls.append("party seeds"),
    )
    _compat.init_crypten(fake, lambda: calls.append("hook"))
    assert calls == ["group", "hook", "party seeds", "dealer seed"]
    # The names it relies on exist in the crypten it targets.
    crypten = import_crypten()
    assert callable(crypten._setup_prng) and callable(crypten.mpc.provider.ttp_provider.TTPClient._init)


def test_stock_mode_applies_the_import_fixes_only() -> None:
    # Benchmarks compare against CrypTen as shipped: it must import, but keep its own
    # generators, ring reduce, decoding and dealer requests; and one process runs one mode.
    code = """
import sys
from mpcfl.errors import MpcflError
from mpcfl.mpc.engine import import_crypten
c = import_crypten(stock=True)
assert import_crypten(stock=True) is c
assert "onnx" not in sys.modules  # crypten's ONNX converter loads on first use (about 1 s of a start)
assert getattr(c.nn.onnx_converter._export_pytorch_model, "_mpcfl_patched", False)
assert sys.modules["torch.onnx._internal.registration"] is not None and "onnx" in sys.modules
assert not getattr(c.common.rng.generate_random_ring_element, "_mpcfl_patched", False)
assert not getattr(c.encoder.FixedPointEncoder.decode, "_mpcfl_patched", False)
assert c.communicator.distributed_communicator.DistributedCommunicator.reduce.__module__.startswith("crypten")
assert not getattr(c.mpc.provider.ttp_provider.TrustedThirdParty.generate_additive_triple, "_mpcfl_patched", False)
assert not getattr(c.mpc.MPCTensor.matmul, "_mpcfl_patched", False)
assert not hasattr(c.mpc.provider.ttp_provider.TrustedThirdParty, "generate_fixed_mask")
assert not getattr(c.config.CrypTenConfig, "_mpcfl_patched", False)
assert not getattr(c.mpc.MPCTensor.sigmoid, "_mpcfl_patched", False)
assert not getattr(c.mpc.primitives.arithmetic.ArithmeticSharedTensor.div_, "_mpcfl_patched", False)
assert not hasattr(c.mpc.provider.ttp_provider.TrustedThirdParty, "generate_truncation")
assert c.mpc.provider.TTPServer.__module__.startswith("crypten") and not getattr(c.uninit, "_mpcfl_patched", False)
try:
    import_crypten()
except MpcflError as err:
    print("refused:", err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: crypten is already imported in stock mode" in done.stdout


def test_a_linear_layer_backward_multiplies_once_and_gets_torch_gradients(crypten_single: None) -> None:
    # The data operand of x @ W^T needs no gradient: one Beaver matmul (W's), not two.
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    beaver = crypten.mpc.primitives.beaver
    calls = []
    original = beaver.matmul

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    torch.manual_seed(0)
    x, w, g = torch.randn(8, 3), torch.randn(1, 3), torch.randn(8, 1)
    weight = crypten.cryptensor(w, requires_grad=True)
    out = crypten.cryptensor(x).matmul(weight.t())
    beaver.matmul = counting
    try:
        out.backward(crypten.cryptensor(g))
    finally:
        beaver.matmul = original
    assert len(calls) == 1
    plain = w.clone().requires_grad_(True)
    (x @ plain.t()).backward(g)
    assert torch.allclose(weight.grad.get_plain_text(), plain.grad, atol=1e-3)
    # When the first operand needs a gradient too, crypten's own backward runs (two products).
    data = crypten.cryptensor(x, requires_grad=True)
    out = data.matmul(crypten.cryptensor(w, requires_grad=True).t())
    beaver.matmul = counting
    try:
        out.backward(crypten.cryptensor(g))
    finally:
        beaver.matmul = original
    assert len(calls) == 3 and data.grad is not None


def test_the_sum_gradient_is_made_on_the_gradient_s_device(crypten_single: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # crypten's own made its public ones on the host, which fails with CUDA shares; the patched
    # one asks for the gradient's device (recorded here) and keeps torch's gradients.
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    made = []
    ones = torch.ones

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        made.append(kwargs.get("device"))
        return ones(*args, **kwargs)

    torch.manual_seed(0)
    x, grad = torch.randn(3, 4), torch.randn(3)
    secret = crypten.cryptensor(x, requires_grad=True)
    out, upstream = secret.sum(1), crypten.cryptensor(grad)
    monkeypatch.setattr(torch, "ones", recording)
    out.backward(upstream)
    monkeypatch.undo()
    assert made == [torch.device("cpu")]
    plain = x.clone().requires_grad_(True)
    plain.sum(1).backward(grad)
    assert torch.allclose(secret.grad.get_plain_text(), plain.grad, atol=1e-3)


def test_matmul_reuses_a_fixed_data_mask_only_where_the_provider_serves_one(crypten_single: None) -> None:
    # MPCTensor.matmul and the matmul backward route fixed data to mpcfl.mpc.fixed_mask; the TTP
    # provider gains its two requests, announced as the others; without a dealer nothing is fixed.
    from mpcfl.mpc import fixed_mask
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    assert getattr(crypten.mpc.MPCTensor.matmul, "_mpcfl_patched", False)
    ttp = crypten.mpc.provider.ttp_provider.TrustedThirdParty
    assert all(getattr(getattr(ttp, name), "_mpcfl_patched", False) for name in ("generate_fixed_mask", "generate_fixed_triple"))
    x = crypten.cryptensor(torch.ones(4, 3))
    assert not fixed_mask.fix(x, "ab" * 32)  # this process has no dealer
    assert fixed_mask.product(x, crypten.cryptensor(torch.ones(3, 1)), transposed=False) is None
    assert torch.allclose(x.matmul(crypten.cryptensor(torch.ones(3, 1))).get_plain_text(), torch.full((4, 1), 3.0))


def test_division_by_a_public_integer_falls_back_to_crypten_s_own_without_a_dealer(crypten_single: None) -> None:
    # div_ asks mpcfl.mpc.truncation first; under TFP (no dealer) even mode dealer divides crypten's way,
    # and a tensor divisor or a divisor out of range always does.
    from mpcfl.mpc import truncation
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    shares = crypten.mpc.primitives.arithmetic.ArithmeticSharedTensor
    assert getattr(shares.div_, "_mpcfl_patched", False)
    assert getattr(crypten.mpc.provider.ttp_provider.TrustedThirdParty.generate_truncation, "_mpcfl_patched", False)
    plain = torch.tensor([1.5, -3.25, 100.0])
    try:
        for mode in truncation.MODES:
            truncation.set_mode(mode)
            x = shares(plain)
            assert truncation.divide(x, 2) is None and truncation.divide(x, 1) is None
            assert torch.allclose(x.div(2).get_plain_text(), plain / 2)
            assert torch.allclose(x.div(2.0).get_plain_text(), plain / 2)
            assert torch.allclose(x.div(torch.tensor([2, 4, 5])).get_plain_text(), plain / torch.tensor([2.0, 4.0, 5.0]))
    finally:
        truncation.set_mode("auto")


def test_settings_read_natively_keep_crypten_s_interface(crypten_single: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import DictConfig, OmegaConf

    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    cfg = crypten.cfg
    assert cfg is crypten.config.cfg is crypten.mpc.mpc.cfg  # one live object, as modules hold it
    try:
        assert cfg.encoder.precision_bits == cfg["encoder.precision_bits"] == 16
        cfg.functions.exp_iterations = 5  # in place, through a section
        assert cfg["functions.exp_iterations"] == 5
        cfg["functions.exp_iterations"] = 6
        cfg.__setattr__("debug.extra.depth", 2)  # a new dotted key creates its sections
        assert cfg.debug.extra.depth == 2
        with pytest.raises(RuntimeError):
            with cfg.temp_override({"functions.exp_iterations": 3, "mpc.fresh": "x"}):
                assert (cfg.functions.exp_iterations, cfg.mpc.fresh) == (3, "x")
                cfg.functions.sqrt_nr_iters = 99  # inside the block: dropped with it, as before
                raise RuntimeError
        assert cfg.functions.exp_iterations == 6 and cfg.functions.sqrt_nr_iters == 3
        assert not hasattr(cfg.mpc, "fresh")
        cfg.set_config(OmegaConf.create({"encoder": {"precision_bits": 20}}))
        assert cfg.encoder.precision_bits == 20
        cfg.set_config({"encoder": {"precision_bits": 18}})
        assert cfg.encoder.precision_bits == 18
    finally:
        cfg.load_config()
    assert cfg.functions.exp_iterations == 8 and cfg.encoder.precision_bits == 16
    assert not hasattr(cfg.debug, "extra")

    # What the patch is for: crypten's hot path reads its settings without OmegaConf (about 30 us a read).
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a crypten setting was read through OmegaConf")

    monkeypatch.setattr(DictConfig, "__getattr__", refuse)
    monkeypatch.setattr(DictConfig, "__getitem__", refuse)
    x = crypten.cryptensor(torch.tensor([1.5, -2.0]))
    y = (x * x + x).relu()
    with cfg.temp_override({"functions.max_method": "pairwise"}):
        assert torch.allclose(y.get_plain_text(), torch.tensor([3.75, 2.0]), atol=1e-3)


def test_settings_read_natively_merge_sections_and_load_files_as_crypten_did(
    crypten_single: None, tmp_path: Path
) -> None:
    """Writes of a whole section merge into it, files load from their path, nested overrides unwind."""
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    cfg = crypten.cfg
    custom = tmp_path / "custom.yaml"
    custom.write_text("mpc:\n  provider: TTP\n  protocol: beaver\n")
    try:
        cfg["mpc"] = {"provider": "TTP"}  # OmegaConf merged a mapping into the section
        assert (cfg.mpc.provider, cfg.mpc.protocol, cfg.mpc.active_security) == ("TTP", "beaver", False)
        with pytest.raises(RuntimeError):
            with cfg.temp_override({"functions.max_method": "pairwise"}):
                with cfg.temp_override({"mpc": {"provider": "TFP"}, "debug.debug_mode": True}):
                    assert (cfg.mpc.provider, cfg.mpc.protocol, cfg.debug.debug_mode) == ("TFP", "beaver", True)
                    raise RuntimeError
        assert (cfg.mpc.provider, cfg.functions.max_method, cfg.debug.debug_mode) == ("TTP", "log_reduction", False)
        other = type(cfg)()
        other.encoder.precision_bits = 20
        cfg.set_config(other)
        assert cfg.encoder.precision_bits == 20
        cfg.load_config(str(custom))  # what crypten.init(config_file=...) calls
        assert cfg.mpc.provider == "TTP" and not hasattr(cfg, "debug")
        with pytest.raises(FileNotFoundError):
            cfg.load_config("")  # a blank path is no file, not the defaults
        cfg.load_config(None)
        cfg["debug.debug_mode"] = "False"  # OmegaConf parsed a dotted write's text: no truthy "False"
        with cfg.temp_override({"debug.validation_mode": "false", "communicator.verbose": "true"}):
            assert (cfg.debug.debug_mode, cfg.debug.validation_mode, cfg.communicator.verbose) == (False, False, True)
    finally:
        cfg.load_config()
    assert (cfg.mpc.provider, cfg.encoder.precision_bits, cfg.debug.debug_mode) == ("TFP", 16, False)


def test_settings_read_natively_keep_what_was_set_before_the_patch() -> None:
    """Settings written before ``import_crypten`` (crypten imported directly first) survive the switch."""
    import importlib.util
    import types

    from omegaconf import DictConfig

    shipped = import_crypten().config.config.__file__
    spec = importlib.util.spec_from_file_location("_crypten_config_unpatched", shipped)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # CrypTen's class as shipped, apart from the live, patched one
    cfg = fresh.CrypTenConfig()
    cfg.mpc.provider = "TTP"
    cfg["debug.extra"] = "${mpc.provider}"
    assert isinstance(cfg.config, DictConfig)
    _compat._read_settings_natively(types.SimpleNamespace(config=types.SimpleNamespace(CrypTenConfig=fresh.CrypTenConfig), cfg=cfg))
    assert not isinstance(cfg.config, DictConfig)
    assert (cfg.mpc.provider, cfg.debug.extra, cfg.encoder.precision_bits) == ("TTP", "TTP", 16)


_NOISE = ("Connection closed by peer", "terminate called", "Traceback")


def test_crypten_s_own_ttp_server_is_mpcfl_s_dealer_and_its_processes_end_cleanly() -> None:
    # CrypTen's run_multiprocess starts crypten.mpc.provider.TTPServer as the dealer and calls
    # crypten.uninit() in every process after it returns. Unpatched, its server spoke another key
    # protocol than the patched parties, closed early, and party 0's "terminate" hit a closed link.
    code = """
import torch
from mpcfl.mpc.engine import import_crypten
crypten = import_crypten()
crypten.cfg.mpc.provider = "TTP"
server = crypten.mpc.provider.TTPServer
assert server is crypten.mpc.provider.ttp_provider.TTPServer and server.__module__ == "mpcfl.mpc.compat"

@crypten.mpc.context.run_multiprocess(world_size=2)
def product():
    x = crypten.cryptensor(torch.arange(4.0), src=0)
    y = crypten.cryptensor(torch.full((4,), 2.0), src=1)
    return (x * y).get_plain_text().tolist()

parties_and_dealer = product()
print("result", parties_and_dealer[:2], type(parties_and_dealer[2]).__name__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "result [[0.0, 2.0, 4.0, 6.0], [0.0, 2.0, 4.0, 6.0]] _TTPServer" in done.stdout
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in _NOISE)], done.stderr


def test_uninit_outside_a_session_returns_and_always_drops_the_dealer_link(
    crypten_single: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CrypTen scripts end with crypten.uninit(), also where the session was already left (after
    # mpcfl.join's block; after the dealer left by itself): a no-op, as init() on an initialised one.
    from crypten.mpc.provider.ttp_provider import TTPClient

    crypten = import_crypten()
    assert getattr(crypten.uninit, "_mpcfl_patched", False)
    crypten.uninit()
    assert not crypten.is_initialized()
    # crypten keeps its TTP client past uninit: a later session would draw from the old dealer's key.
    monkeypatch.setattr(TTPClient, "_TTPClient__instance", object())
    crypten.uninit()  # crypten 0.4.1: ValueError, "Default process group has not been initialized"
    with pytest.raises(RuntimeError, match="TTPClient is not initialized"):
        TTPClient.get()
    monkeypatch.setenv("RENDEZVOUS", f"file://{tmp_path}/store")  # a fresh store for the new group
    crypten.init()  # as the module fixture left it
    assert crypten.is_initialized()


def test_a_crypten_script_under_mpcfl_launch_ends_cleanly() -> None:
    # The TTP session of a script in CrypTen's style (tests/scripts/crypten_party.py): CrypTen's
    # tensors, comparison, model and optimiser, and crypten.uninit() inside and after mpcfl.join.
    names = f"alice{os.getpid()},bob{os.getpid()}"  # in every process's environment, the dealer's too
    script = str(SCRIPTS / "crypten_party.py")
    done = mpcfl("launch", "--provider", "ttp", "--timeout-s", "30", "--parties", names, script, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "crypten party" in line]
    assert len(lines) == 2 and all("product [-2.0, -1.0, 3.0, 12.0] positive [0, 0, 1, 1] loss True" in line for line in lines), done.stdout
    output = done.stdout + done.stderr
    assert "dealer: party 0 ended the session" in output
    assert not [line for line in output.splitlines() if any(n in line for n in _NOISE)], output[-3000:]
    assert_no_leftovers(script)
    assert_no_leftovers(f"MPCFL_PARTIES={names}", source="environ")


def test_an_empty_shell_makes_no_zero_sharing_and_copies_keep_their_values(crypten_single: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Every CrypTen operation fills an MPCTensor([]) shell; crypten 0.4.1 shared the empty list each time.
    crypten = import_crypten()
    arithmetic = crypten.mpc.primitives.ArithmeticSharedTensor
    x = crypten.cryptensor(torch.tensor([1.5, -2.0]))
    draws = []
    original = arithmetic.PRZS
    monkeypatch.setattr(arithmetic, "PRZS", staticmethod(lambda *a, **k: draws.append(a) or original(*a, **k)))
    copies = [x.shallow_copy(), x.clone(), crypten.mpc.MPCTensor.from_shares(x._tensor.share.clone(), precision=16)]
    assert draws == []
    for copy in copies:
        assert torch.equal(copy.get_plain_text(), torch.tensor([1.5, -2.0]))
    crypten.cryptensor(torch.tensor([3.0]))  # sharing a value still draws its zero-sharing
    assert len(draws) == 1
