"""Mask reuse on fixed data (runtime.mask_reuse): the same model, O(n + d) openings per step,
nothing of the data at the dealer, and a dealer that keeps each mask to its one data tensor."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import SCRIPTS, assert_no_leftovers, mpcfl, spy_views
from mpcfl.errors import MpcflError
from mpcfl.mpc.prng import SecureGenerator, new_key
from mpcfl.mpc.providers.ttp import Dealer, DealerRequestRefused, answer_size, request_digest

BINDING, OTHER = "ab" * 32, "cd" * 32
NAMES = ("p0", "p1")  # the parties, by rank


def _request(function: str, *args: object) -> dict:
    return {"function": function, "device": None, "args": args, "kwargs": {}}


def _dealer() -> tuple[Dealer, list[SecureGenerator]]:
    keys = [new_key() for _ in range(2)]
    return Dealer(SimpleNamespace(), [SecureGenerator(k) for k in keys], NAMES), [SecureGenerator(k) for k in keys]


def _serve(dealer: Dealer, message: dict) -> torch.Tensor:
    function, args, kwargs = dealer._check(message)
    return function(*args, **kwargs)


@pytest.mark.parametrize("transposed", [False, True])
def test_a_fixed_mask_triple_multiplies_the_kept_mask(transposed: bool) -> None:
    dealer, streams = _dealer()
    _serve(dealer, _request("fixed_mask", BINDING, (5, 3)))
    a = sum(g.ring((5, 3)) for g in streams)  # each party's share of A, drawn once
    for _ in range(2):  # every triple reuses A with a fresh b
        size1 = (5, 2) if transposed else (3, 2)
        c0 = _serve(dealer, _request("fixed_triple", BINDING, (5, 3), size1, transposed))
        b = sum(g.ring(size1) for g in streams)
        c = c0 + streams[1].ring(tuple(c0.shape))
        assert torch.equal(c, (a.t() if transposed else a) @ b)
        assert c0.shape == answer_size("fixed_triple", (BINDING, (5, 3), size1, transposed), {})


@pytest.mark.parametrize(("transposed", "drawer"), [(False, 1), (True, 1), (False, 0)])
def test_a_one_sided_triple_takes_b_from_its_drawer_alone(transposed: bool, drawer: int) -> None:
    """The model owner's products (mpcfl.mpc.fixed_mask._one_sided_product): the other party's stream
    alone draws b, the owner's share of b is 0, and the shares of A·b still sum to it."""
    dealer, streams = _dealer()
    _serve(dealer, _request("fixed_mask", BINDING, (5, 3)))
    a = sum(g.ring((5, 3)) for g in streams)
    size1 = (5, 2) if transposed else (3, 2)
    c0 = _serve(dealer, _request("fixed_triple", BINDING, (5, 3), size1, transposed, drawer))
    b = streams[drawer].ring(size1)  # the drawer's draw, in the order it draws
    c = c0 + streams[1].ring(tuple(c0.shape))
    assert torch.equal(c, (a.t() if transposed else a) @ b)


def test_a_released_mask_is_forgotten_and_its_binding_takes_a_fresh_one() -> None:
    dealer, streams = _dealer()
    _serve(dealer, _request("fixed_mask", BINDING, (5, 3)))
    first = sum(g.ring((5, 3)) for g in streams)
    assert _serve(dealer, _request("fixed_release", BINDING)).tolist() == [0] and dealer.masks == {}
    _serve(dealer, _request("fixed_mask", BINDING, (5, 3)))  # the parties draw a new A from their streams
    again = sum(g.ring((5, 3)) for g in streams)
    assert torch.equal(dealer.masks[BINDING], again) and not torch.equal(again, first)
    assert answer_size("fixed_release", (BINDING,), {}) == torch.Size([1])


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([_request("fixed_triple", BINDING, (5, 3), (3, 1), False)], "for data abababababababab that has no mask"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_mask", BINDING, (5, 3))], "has a mask already"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_triple", OTHER, (5, 3), (3, 1), False)], "for data cdcdcdcdcdcdcdcd that has no mask"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_triple", BINDING, (6, 3), (3, 1), False)], r"of size \(6, 3\), its mask is \(5, 3\)"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_triple", BINDING, (5, 3), (4, 1), False)], "cannot be computed"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_triple", BINDING, (5, 3), (3, 1), 1)], "malformed arguments"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_triple", BINDING, (5, 3), (3, 1), False, 2)], "malformed arguments"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_triple", BINDING, (5, 3), (3, 1), False, True)], "malformed arguments"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_triple", BINDING, (5, 3), (3, 1), False, 1, 1)], "malformed arguments"),
        ([_request("fixed_mask", "data", (5, 3))], "malformed arguments"),
        ([_request("fixed_mask", BINDING, (5,))], "a mask is a matrix"),
        ([_request("fixed_mask", BINDING, (1 << 20, 1 << 9))], "elements"),
        ([{"function": "batch", "device": None, "args": ((_request("fixed_mask", BINDING, (5, 3)),),), "kwargs": {}}], "registered and released alone"),
        ([_request("fixed_release", BINDING)], "'fixed_release' for data abababababababab that has no mask"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_release", BINDING), _request("fixed_release", BINDING)], "that has no mask"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_release", BINDING), _request("fixed_triple", BINDING, (5, 3), (3, 1), False)], "that has no mask"),
        ([_request("fixed_mask", BINDING, (5, 3)), _request("fixed_release", BINDING, (5, 3))], "malformed arguments"),
        ([_request("fixed_mask", BINDING, (5, 3)),
          {"function": "batch", "device": None, "args": ((_request("fixed_release", BINDING),),), "kwargs": {}}], "registered and released alone"),
    ],
)
def test_the_dealer_keeps_each_mask_to_its_one_data_tensor(messages: list[dict], reason: str, caplog: pytest.LogCaptureFixture) -> None:
    dealer, _ = _dealer()
    for message in messages[:-1]:
        _serve(dealer, message)
    with pytest.raises(DealerRequestRefused, match=reason):
        dealer._check(messages[-1])
    assert "refused" in caplog.text


def test_the_dealer_refuses_a_mask_whose_data_binding_differs_between_parties(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    message = _request("fixed_mask", BINDING, (5, 3))
    announced = {1: request_digest("fixed_mask", None, (OTHER, (5, 3)), {})}
    monkeypatch.setattr(
        dist, "irecv", lambda tensor, src, group: SimpleNamespace(wait=lambda timeout: tensor.copy_(announced[src]))
    )
    dealer = Dealer(SimpleNamespace(ttp_group=None), [SecureGenerator(), SecureGenerator()], NAMES)
    with pytest.raises(DealerRequestRefused, match="request 'fixed_mask' that party 1 did not make"):
        dealer._agree(message)
    announced[1] = request_digest("fixed_mask", None, (BINDING, (5, 3)), {})
    dealer._agree(message)


class _OnePartyDealer:
    """The TTP provider's fixed-mask methods for a single process, which holds every share;
    ordinary triples from the process's own provider."""

    def __init__(self, crypten: object) -> None:
        self.shares = crypten.mpc.primitives.ArithmeticSharedTensor
        self.ordinary = crypten.mpc.get_default_provider()
        self.masks: dict[str, torch.Tensor] = {}
        self.triples = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.ordinary, name)

    def _ring(self, size: tuple) -> torch.Tensor:
        return torch.randint(-(2**62), 2**62, size, dtype=torch.long)

    def generate_fixed_mask(self, binding: str, size: tuple, device: object = None) -> object:
        self.masks[binding] = self._ring(size)
        return self.shares.from_shares(self.masks[binding], precision=0)

    def generate_fixed_triple(self, binding: str, size: tuple, size1: tuple, transposed: bool, device: object = None) -> tuple:
        self.triples += 1
        mask, b = self.masks[binding], self._ring(size1)
        return self.shares.from_shares(b, precision=0), self.shares.from_shares((mask.t() if transposed else mask) @ b, precision=0)


def test_products_with_a_fixed_tensor_match_plaintext_on_all_rows_and_on_batches(crypten_single: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpcfl.mpc import fixed_mask
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    dealer = _OnePartyDealer(crypten)
    monkeypatch.setattr(crypten.mpc, "get_default_provider", lambda: dealer)
    torch.manual_seed(0)
    x, w = torch.randn(40, 6), torch.randn(1, 6)
    data = crypten.cryptensor(x)
    assert fixed_mask.fix(data, BINDING) and fixed_mask.fix(data, BINDING)  # once per tensor
    for rows, triples in ((torch.arange(40), 2), (torch.tensor([3, 17, 5, 39, 0, 22, 8]), 2), (torch.tensor([1, 2]), 0)):
        dealer.triples = 0
        weight = crypten.cryptensor(w, requires_grad=True)
        picked = fixed_mask.rows(data, rows)
        out = picked.matmul(weight.t())
        g = torch.randn(len(rows), 1)
        out.backward(crypten.cryptensor(g))
        plain = w.clone().requires_grad_(True)
        expected = x[rows] @ plain.t()
        expected.backward(g)
        assert torch.allclose(out.get_plain_text(), expected.detach(), atol=1e-3)
        assert torch.allclose(weight.grad.get_plain_text(), plain.grad, atol=1e-3)
        # Two rows of forty: the whole-mask triple would move more than an ordinary one.
        assert dealer.triples == triples, (rows, dealer.triples)
    under_no_grad = data.matmul(crypten.cryptensor(w).t())  # an epoch's metrics
    assert torch.allclose(under_no_grad.get_plain_text(), x @ w.t(), atol=1e-3)
    # Changed in place, the data no longer matches its opened E: refused (it multiplied with the stale E).
    data.add_(1.0)
    with pytest.raises(MpcflError, match="changed in place"):
        data.matmul(crypten.cryptensor(w).t())


def test_products_with_fixed_weights_match_plaintext_for_w_and_its_transpose(crypten_single: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpcfl.mpc import fixed_mask
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    dealer = _OnePartyDealer(crypten)
    monkeypatch.setattr(crypten.mpc, "get_default_provider", lambda: dealer)
    monkeypatch.setattr(_OnePartyDealer, "fixed_mask_room", lambda self: (frozenset(self.masks), 1 << 20), raising=False)
    monkeypatch.setattr(_OnePartyDealer, "release_fixed_mask", lambda self, binding, device=None: self.masks.pop(binding),
                        raising=False)
    torch.manual_seed(0)
    w, table, bias = torch.randn(5, 7), torch.randn(11, 5), torch.randn(5)
    tensors = {name: crypten.cryptensor(t) for name, t in (("fc.weight", w), ("emb.weight", table), ("fc.bias", bias))}
    served = fixed_mask.fix_weights(tensors, label="served weights")
    assert served is not None and sorted(dealer.masks) != [] and len(dealer.masks) == 2  # the bias is no matrix
    for activations in (torch.randn(4, 7), torch.randn(2, 3, 7)):  # a linear layer: x·Wᵀ, leading dims flattened
        dealer.triples = 0
        out = crypten.cryptensor(activations).matmul(tensors["fc.weight"].t())
        assert dealer.triples == 1
        assert torch.allclose(out.get_plain_text(), activations @ w.t(), atol=1e-3)
    one_hot = torch.nn.functional.one_hot(torch.tensor([[3, 0, 10], [7, 7, 1]]), 11).float()  # an embedding: x·W
    dealer.triples = 0
    looked_up = crypten.cryptensor(one_hot).matmul(tensors["emb.weight"])
    assert dealer.triples == 1 and torch.allclose(looked_up.get_plain_text(), one_hot @ table, atol=1e-3)
    # On the left, the weight takes the data's fixed product; a slice of it (attention's split) ordinary triples.
    ones = crypten.cryptensor(torch.ones(7, 2))
    for factor, plain, triples in ((tensors["fc.weight"], w, 1), (tensors["fc.weight"][:2], w[:2], 0)):
        dealer.triples = 0
        expected = plain @ torch.ones(7, 2)
        assert torch.allclose(factor.matmul(ones).get_plain_text(), expected, atol=1e-3)
        assert torch.allclose(ones.t().matmul(factor.t()).get_plain_text(), expected.t(), atol=1e-3)
        assert dealer.triples == 2 * triples
    # Two live fixings never share a binding (the dealer would refuse it): after releasing the first,
    # a third takes the first's bindings, not the second's; a transpose kept past its release is
    # multiplied on ordinary triples, not with the forgotten mask.
    kept_view = tensors["fc.weight"].t()
    others = {name: crypten.cryptensor(t) for name, t in (("fc.weight", w), ("emb.weight", table))}
    second = fixed_mask.fix_weights(others, label="served weights")
    assert len(dealer.masks) == 4 and second not in (None, served)
    fixed_mask.release_weights(tensors)
    assert len(dealer.masks) == 2
    dealer.triples = 0
    stale = crypten.cryptensor(torch.ones(4, 7)).matmul(kept_view)
    assert dealer.triples == 0 and torch.allclose(stale.get_plain_text(), torch.ones(4, 7) @ w.t(), atol=1e-3)
    third = {name: crypten.cryptensor(t) for name, t in (("fc.weight", w), ("emb.weight", table))}
    assert fixed_mask.fix_weights(third, label="served weights") == served and len(dealer.masks) == 4
    # No room left at the dealer: nothing fixed, ordinary triples.
    monkeypatch.setattr(_OnePartyDealer, "fixed_mask_room", lambda self: (frozenset(self.masks), 5 * 7 + 11 * 5 - 1))
    assert fixed_mask.fix_weights({"fc.weight": crypten.cryptensor(w), "emb.weight": crypten.cryptensor(table)},
                                  label="served weights") is None
    # Changed in place after its mask was opened: refused, the transpose too.
    tensors = third
    tensors["fc.weight"].add_(1.0)
    with pytest.raises(MpcflError, match="changed in place"):
        crypten.cryptensor(torch.randn(4, 7)).matmul(tensors["fc.weight"].t())


def _encoded(values: np.ndarray) -> np.ndarray:
    """Ring units of values, with their neighbours (fixed-point rounding), the telling ones only."""
    ring = np.round(values.reshape(-1) * 2**16).astype(np.int64)
    ring = ring[np.abs(ring) >= 1 << 12]
    return np.unique(np.concatenate([ring + delta for delta in range(-2, 3)]))


def test_the_dealer_never_holds_the_data_and_each_step_opens_o_n_plus_d(spied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND"):  # crypten_single's, if it ran first
        monkeypatch.delenv(key, raising=False)  # else the launcher records as a rank
    script = str(SCRIPTS / "fixed_mask_party.py")
    result = mpcfl("launch", "--timeout-s", "30", "--parties", "p0,p1", script, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(re.findall(r"fixed mask party (\d) on cpu: (.*)", result.stdout))
    assert set(lines) == {"0", "1"}, result.stdout[-2000:]
    n, d = 512, 16
    for rank, line in lines.items():
        assert "fixed=True" in line
        # The same SGD steps on ordinary triples train the same weights, up to fixed point's
        # truncations (about 1 unit per product in each path, 6 steps); the gradients follow plaintext's.
        assert float(re.search(r"apart=(\S+)", line).group(1)) <= 24, line
        assert float(re.search(r"worst=(\S+)", line).group(1)) < 2e-2, line
        # Steps 2 and 3 of each size took their fixed-mask triples from one prefetched batch each.
        assert json.loads(re.search(r"prefetch=(\{.*?\})", line).group(1)) == {"batches": 4, "served": 8}, line
        costs = json.loads(line.split("costs=", 1)[1])
        # The fix opens the n x d difference once; then each step (forward and backward) moves
        # O(n + d) elements: w - b and g - b opened, the dealer's n x 1 and d x 1 answers, requests.
        assert costs["fix"] >= 8 * n * d, costs
        assert all(step <= 8 * 4 * (n + d) for step in costs["steps"]), costs
    views = spy_views(spied)
    data = _encoded(np.random.default_rng(11).uniform(-100, 100, size=(n, d)))
    dealer = views["2"]["seen_protocol"]
    assert int(np.isin(dealer, data).sum()) == 0, "the dealer holds values of the data"
    for rank in ("0", "1"):
        share, opened = views[rank]["own_share"], views[rank]["own_opened"]
        assert int(np.isin(dealer, share).sum()) == 0, f"the dealer holds party {rank}'s share of the data"
        assert int(np.isin(dealer, opened).sum()) == 0, "the dealer holds the opened E = X - A (it knows A: that is X)"
        assert int(np.isin(dealer, views[rank]["own_masked"]).sum()) == 0, f"the dealer holds party {rank}'s part of E"
    # The spy does see such values where they go: each party receives its peer's part of E (E is then
    # their sum), never the peer's share of X.
    assert int(np.isin(views["1"]["seen_protocol"], views["0"]["own_share"]).sum()) == 0
    assert int(np.isin(views["1"]["seen_protocol"], views["0"]["own_masked"]).sum()) >= n * d // 2
    assert_no_leftovers(script)
