"""A party script written against CrypTen's own API, as users bring them to ``mpcfl launch``.

Only the session comes from mpcfl (``mpcfl.join``: authenticated, the dealer included); the rest is
CrypTen's: tensors, a comparison, a model trained a step with ``crypten.optim.SGD``, and
``crypten.uninit()`` at the end, as CrypTen's examples finish. The last party calls it inside the
session block, the others after it, once mpcfl has already left the session.
"""

import torch

import mpcfl

with mpcfl.join() as me:
    import crypten  # the module mpcfl.join imported through mpcfl.mpc.compat

    x = crypten.cryptensor(torch.tensor([-2.0, -0.5, 1.0, 3.0]), src=0)
    y = crypten.cryptensor(torch.tensor([1.0, 2.0, 3.0, 4.0]), src=me.session.world_size - 1)
    product = [round(v, 3) for v in (x * y).get_plain_text().tolist()]  # fixed point: within 2^-16
    positive = (x > 0).get_plain_text()
    torch.manual_seed(0)  # every party builds the same model; party 0's weights are shared
    model = crypten.nn.from_pytorch(torch.nn.Sequential(torch.nn.Linear(4, 2)), torch.zeros(1, 4)).encrypt(src=0)
    model.train()
    optimizer = crypten.optim.SGD(model.parameters(), lr=0.1)
    loss = crypten.nn.MSELoss()(model(crypten.cryptensor(torch.ones(3, 4))), crypten.cryptensor(torch.zeros(3, 2)))
    model.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"crypten party {me.name}: product {product} positive {positive.tolist()} loss {loss.get_plain_text().item() >= 0}")
    if me.rank == me.session.world_size - 1:
        crypten.uninit()
crypten.uninit()
