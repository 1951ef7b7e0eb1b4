"""A party 0 that deviates: it asks the dealer for a triple no other party asked for.

With CrypTen's dealer the answer would be minus party 1's next stream values,
i.e. the mask of party 1's next input. mpcfl's dealer must refuse instead.
"""

import torch

import mpcfl
from mpcfl.mpc.engine import import_crypten

with mpcfl.join() as me:
    crypten = import_crypten()  # crypten imports only through the compat module
    TTPClient = crypten.mpc.provider.ttp_provider.TTPClient
    x = crypten.cryptensor(torch.ones(4), src=1)
    if me.rank == 0:
        answer = TTPClient.get().ttp_request("square", None, torch.Size([7]))
        print(f"rogue: the dealer answered {answer.tolist()}")
    print((x * x).sum().get_plain_text().item())
