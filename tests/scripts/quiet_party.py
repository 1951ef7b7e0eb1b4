"""Parties busy with a local step longer than the job's timeout (as PSI on many IDs is).

``quiet_dealer`` tells the dealer to wait longer for the next request, and
``patience_s`` lets the waiting party's receive outlast the timeout; without
either, the dealer or party 1 would give up on a peer that is merely busy.
Run with ``--timeout-s 3``: party 0 works for 6 s before it sends.
"""

import time

import torch

import mpcfl
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.session import quiet_dealer, recv_bytes, send_bytes

BUSY_S = 6
with mpcfl.join() as me:
    crypten = import_crypten()
    x = crypten.cryptensor(torch.arange(4.0), src=1)
    quiet_dealer(2 * BUSY_S)
    if me.rank == 0:
        time.sleep(BUSY_S)
        send_bytes(b"done", 1, patience_s=2 * BUSY_S)
    else:
        assert recv_bytes(0, limit=8, what="note", patience_s=2 * BUSY_S) == b"done"
    print("quiet: product", (x * x).get_plain_text().tolist())
