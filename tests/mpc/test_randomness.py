"""Masks and triples come from AES-CTR keyed from the OS; the dealer answers only known requests."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.generators import InsecureGeneratorError, make_drawers
from mpcfl.mpc.prng import SecureGenerator, key_to_words, new_key, numpy_generator, words_to_key
from mpcfl.mpc.providers.ttp import PRODUCTS, Dealer, DealerRequestRefused

NAMES = ("p0", "p1", "p2")  # the parties, by rank


def test_a_key_fixes_the_stream_and_keys_are_full_width() -> None:
    key = new_key()
    assert words_to_key(key_to_words(key)) == key
    assert torch.equal(SecureGenerator(key).ring((4, 5)), SecureGenerator(key).ring((4, 5)))
    assert not torch.equal(SecureGenerator(key).ring((8,)), SecureGenerator(key ^ (1 << 127)).ring((8,)))
    keys = {new_key() for _ in range(64)}
    assert len(keys) == 64 and max(keys).bit_length() > 64  # more than a 64-bit (let alone 32-bit) seed


def test_ring_elements_cover_the_ring_and_kbit_values_their_range() -> None:
    generator = SecureGenerator()
    ring = generator.ring((100_000,))
    assert ring.dtype == torch.int64
    assert (ring < 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert ring.abs().max().item() > 2**62
    bits = generator.kbit((100_000,), 1)
    assert set(bits.unique().tolist()) == {0, 1}
    assert bits.float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert 0 <= generator.kbit((1000,), 7).min().item() and generator.kbit((1000,), 7).max().item() < 128
    scalar = generator.kbit((), 1)  # a 0-d tensor's B2A draws (comparing a scalar CrypTensor)
    assert scalar.shape == () and scalar.item() in (0, 1) and generator.ring(()).shape == ()
    assert np.isfinite(numpy_generator().normal(size=3)).all()


def test_crypten_draws_only_from_secure_generators() -> None:
    crypten = import_crypten()
    for module in (crypten.common.rng, crypten.mpc.primitives.arithmetic, crypten.mpc.provider.ttp_provider):
        with pytest.raises(InsecureGeneratorError, match="only SecureGenerator"):
            module.generate_random_ring_element((3,), generator=torch.Generator())
    with pytest.raises(InsecureGeneratorError):
        crypten.mpc.primitives.binary.generate_kbit_random_tensor((3,), generator=torch.Generator())
    ring_element, _ = make_drawers(crypten)
    key = new_key()
    assert torch.equal(ring_element(torch.Size([2, 3]), generator=SecureGenerator(key)), SecureGenerator(key).ring((2, 3)))


def test_sharing_and_multiplying_draw_nothing_from_torch(crypten_single: None, monkeypatch: pytest.MonkeyPatch) -> None:
    crypten = import_crypten()
    assert all(isinstance(crypten.generators[name][torch.device("cpu")], SecureGenerator) for name in ("prev", "next", "local", "global"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch's generator was used")

    for name in ("randint", "rand", "randn", "randperm"):
        monkeypatch.setattr(torch, name, refuse)
    x = crypten.cryptensor(torch.tensor([1.5, -2.0]))
    assert (x * x).sum().get_plain_text().item() == pytest.approx(6.25, abs=1e-3)


def test_negative_values_decode_exactly(crypten_single: None) -> None:
    crypten = import_crypten()
    encoded = torch.tensor([-64845865, -65536 * 990, -1, 65536 * 3 + 1])  # -989.469..., -990, -2^-16, 3 + 2^-16
    decoded = crypten.encoder.FixedPointEncoder().decode(encoded)
    expected = encoded.double() / 2**16
    assert torch.allclose(decoded.double(), expected, atol=1e-4)


def _dealer(parties: int) -> tuple[Dealer, list[SecureGenerator]]:
    keys = [new_key() for _ in range(parties)]
    return Dealer(SimpleNamespace(), [SecureGenerator(k) for k in keys], NAMES), [SecureGenerator(k) for k in keys]


@pytest.mark.parametrize("parties", [2, 3])
def test_the_dealers_triples_multiply(parties: int) -> None:
    dealer, mine = _dealer(parties)
    function, args, kwargs = dealer._check({"function": "additive", "device": None, "args": ((4, 3), (3, 2), "matmul"), "kwargs": {}})
    c0 = function(*args, **kwargs)
    # Each party draws its shares in CrypTen's order: a_i, b_i, then c_i for i > 0.
    shares = [(g.ring((4, 3)), g.ring((3, 2))) for g in mine]
    c = c0 + sum(g.ring((4, 2)) for g in mine[1:])
    a, b = sum(s[0] for s in shares), sum(s[1] for s in shares)
    assert torch.equal(c, a @ b)


@pytest.mark.parametrize("options", [{"padding": 2, "stride": 1}, {"padding": (2, 2)}, {"stride": [1, 1], "padding": [2, 2], "dilation": [1, 1], "groups": 1}])
def test_the_dealer_takes_conv_options_in_any_form_crypten_sends(options: dict) -> None:
    """Lists come from crypten.nn.from_pytorch's ONNX converter (refused before: LeNet-5 by raw
    CrypTen code in mpcfl's processes failed at its first convolution)."""
    dealer, _ = _dealer(2)
    message = {"function": "additive", "device": None, "args": ((1, 1, 8, 8), (2, 1, 3, 3), "conv2d"), "kwargs": options}
    function, args, kwargs = dealer._check(message)
    assert function(*args, **kwargs).shape == torch.nn.functional.conv2d(torch.zeros(1, 1, 8, 8), torch.zeros(2, 1, 3, 3), **kwargs).shape


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"function": "__init__", "device": None, "args": (), "kwargs": {}}, "unknown request '__init__'"),
        ({"function": "additive", "device": None, "args": ((2,), (2,), "system"), "kwargs": {}}, "unknown product"),
        ({"function": "additive", "device": None, "args": ((2,), (2,), "mul"), "kwargs": {"out": 1}}, "unexpected arguments"),
        ({"function": "square", "device": None, "args": ((-1,),), "kwargs": {}}, "malformed size"),
        ({"function": "square", "device": None, "args": ((1 << 20, 1 << 20),), "kwargs": {}}, "elements"),
        ({"function": "additive", "device": None, "args": ((4, 0), (0, 4), "matmul"), "kwargs": {}}, "malformed size"),
        ({"function": "additive", "device": None, "args": ((1 << 20, 1), (1, 1 << 20), "mul"), "kwargs": {}}, "elements"),
        ({"function": "additive", "device": None, "args": ((1, 1, 4, 4), (1, 1, 2, 2), "conv2d"), "kwargs": {"padding": 100_000}}, "options beyond"),
        ({"function": "additive", "device": None, "args": ((1, 1, 4, 4), (1, 1, 2, 2), "conv2d"), "kwargs": {"padding": (True, "x")}}, "options beyond"),
        ({"function": "additive", "device": None, "args": ((1, 1, 4, 4), (1, 1, 2, 2), "conv2d"), "kwargs": {"stride": 0}}, "options beyond"),
        ({"function": "additive", "device": None, "args": ((1, 1, 4, 4), (1, 1, 2, 2), "conv2d"), "kwargs": {"dilation": [0, 0]}}, "options beyond"),
        ({"function": "additive", "device": None, "args": ((1, 1, 4, 4), (1, 1, 2, 2), "conv2d"), "kwargs": {"stride": [1, 1, 1]}}, "options beyond"),
        ({"function": "additive", "device": None, "args": ((3, 2), (4, 5), "matmul"), "kwargs": {}}, "cannot be computed"),
        ({"function": "square", "device": "meta", "args": ((2,),), "kwargs": {}}, "device 'meta'"),
        ({"function": "square", "device": "cuda:x", "args": ((2,),), "kwargs": {}}, "device 'cuda:x'"),
        ({"function": "square", "device": 0, "args": ((2,),), "kwargs": {}}, "device 0"),
        ({"function": "square"}, "malformed request"),
        ("shutdown", "malformed request"),
        ({"function": "quiet", "device": None, "args": (10**9,), "kwargs": {}}, "request 'quiet' with arguments"),
        ({"function": "quiet", "device": None, "args": (1.5,), "kwargs": {}}, "request 'quiet' with arguments"),
        ({"function": "quiet", "device": None, "args": (0,), "kwargs": {}}, "request 'quiet' with arguments"),
    ],
)
def test_the_dealer_refuses_what_is_not_in_its_table(message: object, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    dealer, _ = _dealer(2)
    with pytest.raises(DealerRequestRefused, match=reason):
        dealer._check(message)
    assert "refused" in caplog.text


@pytest.mark.parametrize("device", [None, "cpu", "cuda", "cuda:0"])
def test_the_dealer_answers_from_host_memory_whatever_the_device(device: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cuda session's triples are computed and sent from the host: gloo copies them into
    party 0's CUDA buffer, so the dealer needs no GPU (this machine has none) and moves nothing."""
    sent: list[torch.Tensor] = []
    comm = SimpleNamespace(
        get_ttp_rank=lambda: 2, ttp_group=None, ttp_comm_group=None,
        send_obj=lambda obj, dst, group: None, broadcast=lambda tensor, src, group: sent.append(tensor),
    )
    dealer = Dealer(comm, [SecureGenerator(), SecureGenerator()], NAMES)
    messages = iter([{"function": "square", "device": device, "args": ((3,),), "kwargs": {}}, "terminate"])
    monkeypatch.setattr(dealer, "_receive", lambda: next(messages))
    monkeypatch.setattr(dealer, "_agree", lambda message: None)
    dealer.serve()
    assert [(t.device.type, tuple(t.shape), t.dtype) for t in sent] == [("cpu", (3,), torch.int64)]


def test_parties_digest_the_request_party_0_sends() -> None:
    from mpcfl.mpc.providers.ttp import request_digest

    party0 = request_digest("additive", "cuda:0", (torch.Size([2, 3]), torch.Size([3]), "matmul"), {})
    party1 = request_digest("additive", torch.device("cuda:1"), ((2, 3), (3,), "matmul"), {})
    assert torch.equal(party0, party1)
    assert not torch.equal(party0, request_digest("additive", "cuda", ((2, 3), (3,), "mul"), {}))
    assert set(PRODUCTS) == {"mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"}


def test_a_quiet_request_lets_the_dealer_wait_longer_for_the_next_one_only() -> None:
    dealer, _ = _dealer(2)
    function, args, kwargs = dealer._check({"function": "quiet", "device": None, "args": (90,), "kwargs": {}})
    assert function(*args, **kwargs).tolist() == [0] and dealer._patience_s == 90


def test_the_dealer_raises_the_link_error_instead_of_swallowing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    def reset(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(dist, "irecv", reset)
    dealer = Dealer(SimpleNamespace(get_ttp_rank=lambda: 2, ttp_group=None), [SecureGenerator(), SecureGenerator()], NAMES)
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        dealer.serve()


def _item(function: str, *args: object, **kwargs: object) -> dict:
    return {"function": function, "device": None, "args": args, "kwargs": kwargs}


def _batch(*items: object) -> dict:
    return {"function": "batch", "device": None, "args": (tuple(items),), "kwargs": {}}


@pytest.mark.parametrize("parties", [2, 3])
def test_a_batch_answers_what_its_items_answer_one_by_one(parties: int) -> None:
    """The dealer computes a batch's items in order: each stream is drawn in the parties' order."""
    from mpcfl.mpc.providers.ttp import answer_size, batch_digest

    items = [
        _item("additive", (4, 3), (3, 2), "matmul"), _item("square", (5,)), _item("binary", (2, 1), (1, 3)),
        _item("wraps", (3,)), _item("B2A", (4,)), _item("additive", (1, 1, 4, 4), (1, 1, 2, 2), "conv2d", padding=1),
        _item("truncation", (2, 3), 1 << 16),
    ]
    keys = [new_key() for _ in range(parties)]
    batched = Dealer(SimpleNamespace(), [SecureGenerator(k) for k in keys], NAMES)
    function, args, kwargs = batched._check(_batch(*items))
    flat = function(*args, **kwargs)
    single = Dealer(SimpleNamespace(), [SecureGenerator(k) for k in keys], NAMES)
    one_by_one = []
    for item in items:
        f, a, k = single._check(item)
        answer = f(*a, **k)
        assert answer.shape == answer_size(item["function"], item["args"], item["kwargs"])
        one_by_one.append(answer.flatten())
    assert torch.equal(flat, torch.cat([*one_by_one, batch_digest(tuple(items))]))  # then the batch's digest
    # The next request may come a whole step later: the dealer waits the timeout per item served.
    from mpcfl.mpc.compat import process_group_timeout

    assert batched._patience_s == int(process_group_timeout().total_seconds()) * (len(items) - 1)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (_batch(), "'batch' of 0 requests"),
        ({"function": "batch", "device": None, "args": ([_item("square", (2,))],), "kwargs": {}}, "'batch' with malformed arguments"),
        ({"function": "batch", "device": "cpu", "args": ((_item("square", (2,)),),), "kwargs": {}}, "'batch' with malformed arguments"),
        (_batch(_item("square", (2,)), _item("quiet", 10)), r"'quiet' \(item 1 of a batch\)"),
        (_batch(_batch(_item("square", (2,)))), r"'batch' \(item 0 of a batch\)"),
        (_batch(_item("square", (2,)), "square"), r"malformed request \(str\) \(item 1 of a batch\)"),
        (_batch(_item("additive", (2,), (2,), "system")), "unknown product"),
        (_batch(_item("square", (0,))), "malformed size"),
        (_batch(*[_item("square", (1 << 13, 1 << 12)) for _ in range(5)]), "'batch' of more than"),  # 4 fit alone, not 5
        (_batch(*[_item("square", (1,)) for _ in range(4097)]), "'batch' of 4097 requests"),
    ],
)
def test_the_dealer_refuses_malformed_and_oversize_batches(message: object, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    dealer, _ = _dealer(2)
    with pytest.raises(DealerRequestRefused, match=reason):
        dealer._check(message)
    assert "refused" in caplog.text


def test_the_dealer_serves_a_batch_only_if_every_party_announced_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from mpcfl.mpc.providers.ttp import batch_digest

    items = (_item("square", (2,)), _item("additive", (2,), (2,), "mul"))
    announced = {1: batch_digest(items), 2: batch_digest(items[:1])}
    monkeypatch.setattr(
        dist, "irecv", lambda tensor, src, group: SimpleNamespace(wait=lambda timeout: tensor.copy_(announced[src]))
    )
    dealer = Dealer(SimpleNamespace(ttp_group=None), [SecureGenerator() for _ in range(3)], NAMES)
    with pytest.raises(DealerRequestRefused, match=r"request 'batch' \(2 requests\) that party 2 did not make"):
        dealer._agree(_batch(*items))
    announced[2] = batch_digest(items)
    dealer._agree(_batch(*items))
    # The digest covers each item's canonical form: order and sizes matter, torch.Size vs tuple does not.
    assert torch.equal(batch_digest(items), batch_digest((_item("square", torch.Size([2])), items[1])))
    assert not torch.equal(batch_digest(items), batch_digest(items[::-1]))


@pytest.mark.parametrize(
    ("op", "a", "b", "kwargs"),
    [
        ("mul", (4, 1, 3), (5, 1), {}),
        ("mul", (), (2, 3), {}),
        ("matmul", (7,), (7,), {}),
        ("matmul", (2, 7), (7,), {}),
        ("matmul", (7,), (7, 3), {}),
        ("matmul", (4, 1, 2, 7), (3, 7, 5), {}),
        ("conv1d", (2, 4, 9), (6, 2, 3), {"stride": 2, "padding": 1, "groups": 2}),
        ("conv2d", (3, 1, 28, 28), (6, 1, 5, 5), {"stride": [1, 1], "padding": [2, 2], "dilation": [1, 1]}),
        ("conv2d", (1, 28, 28), (6, 1, 5, 5), {}),
        ("conv_transpose2d", (2, 3, 7, 7), (3, 4, 3, 3), {"stride": 2, "output_padding": 1}),
    ],
)
def test_answer_sizes_follow_torch_without_the_meta_device(op: str, a: tuple, b: tuple, kwargs: dict) -> None:
    from mpcfl.mpc.providers.ttp import answer_size

    expected = getattr(torch, op)(torch.zeros(a), torch.zeros(b)) if op in ("mul", "matmul") else getattr(torch.nn.functional, op)(torch.zeros(a), torch.zeros(b), **kwargs)
    assert answer_size("additive", (a, b, op), kwargs) == expected.shape


@pytest.mark.parametrize(
    ("op", "a", "b", "kwargs"),
    [
        ("mul", (3, 2), (4, 2), {}),
        ("matmul", (3, 2), (3, 2), {}),
        ("matmul", (), (3,), {}),
        ("conv2d", (1, 2, 5, 5), (4, 3, 3, 3), {}),
        ("conv2d", (1, 3, 2, 2), (4, 3, 3, 3), {}),
        ("conv_transpose2d", (1, 3, 5, 5), (3, 4, 3, 3), {"output_padding": 1}),  # not below stride 1
    ],
)
def test_answer_sizes_refuse_what_torch_refuses(op: str, a: tuple, b: tuple, kwargs: dict) -> None:
    from mpcfl.mpc.providers.ttp import answer_size

    with pytest.raises(ValueError):
        answer_size("additive", (a, b, op), kwargs)


def test_convolution_sizes_agree_with_torch_on_random_shapes_and_options() -> None:
    from mpcfl.mpc.providers.ttp import answer_size

    rng = np.random.default_rng(7)
    for _ in range(400):
        op = str(rng.choice(["conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"]))
        dims, groups = (1 if op.endswith("1d") else 2), int(rng.choice([1, 2]))
        kwargs = {"stride": int(rng.integers(1, 4)), "padding": int(rng.integers(0, 3)), "dilation": int(rng.integers(1, 3)), "groups": groups}
        if op.startswith("conv_transpose"):
            kwargs["output_padding"] = int(rng.integers(0, 3))
        channels, out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
        x = (1, channels + int(rng.integers(0, 2)), *(int(v) for v in rng.integers(1, 8, dims)))  # sometimes a channel off
        w = ((channels, out // groups) if op.startswith("conv_transpose") else (out, channels // groups)) + tuple(int(v) for v in rng.integers(1, 5, dims))
        try:
            expected = tuple(getattr(torch.nn.functional, op)(torch.zeros(x), torch.zeros(w), **kwargs).shape)
        except RuntimeError:
            expected = None
        try:
            got = tuple(answer_size("additive", (x, w, op), kwargs))
        except ValueError:
            got = None
        assert got == expected, (op, x, w, kwargs)


def test_a_huge_convolution_is_sized_without_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpcfl.mpc.providers.ttp import answer_size

    # Party 0's message alone sets these sizes before the digests are checked: no tensor may be made.
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: pytest.fail("allocated"))
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated"))
    assert answer_size("additive", ((1, 1 << 14, 1), (1 << 14, 1 << 14, 1), "conv1d"), {}) == torch.Size([1, 1 << 14, 1])


class _KeyPost:
    """A fake communicator for :func:`pair_generators`: sends land in a mailbox the test reads."""

    def __init__(self) -> None:
        self.mail: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, rank: int) -> SimpleNamespace:
        def isend(words: torch.Tensor, dst: int) -> SimpleNamespace:
            self.mail[rank, dst] = words.clone()
            return SimpleNamespace(wait=lambda: None)

        def irecv(words: torch.Tensor, src: int) -> SimpleNamespace:
            return SimpleNamespace(wait=lambda: words.copy_(self.mail[src, rank]))

        return SimpleNamespace(isend=isend, irecv=irecv)


@pytest.mark.parametrize("parties", [3, 4, 5])
@pytest.mark.parametrize("xor", [False, True])
def test_a_pairwise_zero_sharing_resists_every_coalition_short_of_all_other_parties(parties: int, xor: bool) -> None:
    import itertools

    from mpcfl.mpc.generators import pair_generators, pairwise_zero_sharing

    post = _KeyPost()
    pairs = {rank: pair_generators(post.at(rank), parties, rank) for rank in range(parties)}  # lower ranks send first
    size = (1000,)
    shares = {rank: pairwise_zero_sharing(size, xor=xor, pairs=pairs[rank]) for rank in range(parties)}
    combined = functools.reduce(torch.bitwise_xor if xor else torch.add, shares.values())
    assert torch.equal(combined, torch.zeros(size, dtype=torch.int64))

    def stream(low: int, high: int) -> torch.Tensor:  # what either party of a pair draws with the other
        key = post.mail.get((low, high))
        return torch.zeros(size, dtype=torch.int64) if key is None else SecureGenerator(words_to_key(key)).ring(size)

    for owner in range(parties):
        others = [rank for rank in range(parties) if rank != owner]
        for coalition in itertools.combinations(others, parties - 2):
            # Strip from the owner's share every draw the coalition also drew: one pair stream is left.
            left = shares[owner]
            for member in coalition:
                drawn = stream(min(owner, member), max(owner, member))
                left = left ^ drawn if xor else left - (1 if member > owner else -1) * drawn
            assert bool((left != 0).all()), f"parties {coalition} strip party {owner}'s zero-sharing"
            (missing,) = set(others) - set(coalition)
            residue = stream(min(owner, missing), max(owner, missing))
            assert torch.equal(left, residue if xor or missing > owner else -residue)
