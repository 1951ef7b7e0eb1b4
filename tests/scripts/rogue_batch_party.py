"""A party 0 that deviates under prefetching: its batch differs from the one the others announce.

Party 1 announces the digest of the step it recorded (one multiplication); party 0
asks for another batch instead, whose answer would be minus party 1's next stream
values. mpcfl's dealer must refuse it.
"""

import torch

import mpcfl
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.providers.ttp import prefetched

with mpcfl.join() as me:
    crypten = import_crypten()  # crypten imports only through the compat module
    TTPClient = crypten.mpc.provider.ttp_provider.TTPClient
    x = crypten.cryptensor(torch.ones(4), src=1)
    with prefetched("step"):  # recorded by every party
        print((x * x).sum().get_plain_text().item())
    if me.rank == 0:
        rogue = {"function": "square", "device": None, "args": ((7,),), "kwargs": {}}
        answer = TTPClient.get().ttp_request("batch", None, (rogue,))
        print(f"rogue: the dealer answered {answer.tolist()}")
    else:
        with prefetched("step"):  # announces the recorded batch
            print((x * x).sum().get_plain_text().item())
