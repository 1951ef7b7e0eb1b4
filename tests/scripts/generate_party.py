"""Secure generation in one session, run by p0 (model owner) and p1 (data owner) under ``mpcfl launch``:
one ``mpcfl.serve`` server of a small Hugging Face GPT-2 generates 3 tokens for 2 prompts with only the
tokens opened (the argmax under MPC; the key-value cache on), the same again without the cache (each
token runs the whole prefix) and with it, then 2 with the logits opened to p1 and picked by its sampler;
then the parties ask for different ``steps`` and are refused. Each party prints what it got, the
bytes of each generation, and, on p1, each token's regret against plaintext's logits on the same prefix.
Under the recorder (tests/spy), the later generations are tagged phases ``prefix``, ``cached`` and
``logits``. A test imports ``MODEL``, ``PROMPT`` and ``GENERATIONS`` from here.
"""

import json

import torch
import transformers

import mpcfl
from mpcfl.errors import MpcflError
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.session import communication_stats

try:
    import sitecustomize as spy  # the recorder, when the test loads it
except ImportError:
    spy = None

torch.manual_seed(0)
CONFIG = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
MODEL = transformers.GPT2LMHeadModel(CONFIG).eval()
with torch.no_grad():  # distinct weights far from zero: a recorder can tell them apart from anything public
    for parameter in MODEL.parameters():
        parameter.uniform_(-0.5, 0.5)
PROMPT = torch.randint(0, 40, (2, 3))
# (recorder phase, steps, reveal_logits, key_value_cache) of each generation, in order
GENERATIONS = (("protocol", 3, False, True), ("prefix", 3, False, False), ("cached", 3, False, True),
               ("logits", 2, True, True))


def regret(ids: torch.Tensor) -> float:
    """How far below plaintext's best each generated token's logit is, on the same prefix (0: the argmax)."""
    with torch.no_grad():
        logits = MODEL(ids[:, :-1]).logits[:, PROMPT.shape[1] - 1 :]
    chosen = logits.gather(-1, ids[:, PROMPT.shape[1] :, None])[..., 0]
    return float((logits.max(-1).values - chosen).max())


def main() -> None:
    with mpcfl.join() as me:
        mine = PROMPT if me.rank == 1 else None
        got, moved, kept = [], [], []
        with mpcfl.serve(MODEL, model_owner="p0", data_owner="p1") as served:
            for phase, steps, logits, cache in GENERATIONS:
                if spy is not None and hasattr(spy, "phase"):
                    spy.phase(phase)
                before = communication_stats()["bytes"]
                out = served.generate(mine, steps, reveal_logits=logits, sample=(lambda x: x.argmax(-1)) if logits else None,
                                      key_value_cache=cache)
                moved.append(communication_stats()["bytes"] - before)
                got.append(None if out is None else out.tolist())
                kept.append(len(import_crypten().mpc.get_default_provider().fixed_mask_room()[0]))
            try:
                served.generate(mine, 2 + me.rank)
                refused = ""
            except MpcflError as err:
                refused = str(err)
        regrets = [regret(torch.tensor(ids)) for ids in got] if me.rank == 1 else []
        print(f"generate party {me.rank}: got={json.dumps(got)} moved={json.dumps(moved)} kept={kept} regrets={json.dumps(regrets)} "
              f"refused={refused}", flush=True)


if __name__ == "__main__":  # a test imports the model and prompt alone
    main()
