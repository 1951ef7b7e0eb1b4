"""The trusted-third-party triple provider: the dealer process and its key hand-out.

The dealer shares one 128-bit AES-CTR key with each party (sent once, at start-up,
over the authenticated process group). Party i and the dealer then draw the same
stream: party i's share of every triple comes from it, so the dealer knows every
share without sending any, and only party 0's share of each product is computed
by the dealer and sent to party 0. This is the protocol of CrypTen 0.4.1's TTP
(``crypten.mpc.provider.ttp_provider``), whose party side is kept as is; four things
differ here:

- every draw comes from :class:`~mpcfl.mpc.prng.SecureGenerator`, not from a
  ``torch.Generator`` seeded with 32 effective bits;
- the dealer answers only the requests it knows. CrypTen's server runs
  ``getattr(self, name)`` on whatever name party 0 sends, and ``getattr(torch, op)``
  for the product; here both come from fixed tables, the sizes and options are
  checked, and anything else is refused, logged and ends the dealer;
- the dealer computes on the host and sends host memory, whatever device a request
  names: gloo's broadcast copies the answer into party 0's buffer on that device (a
  CUDA one for a ``cuda`` session), so the dealer needs no GPU and moves nothing to
  one. The device is still checked and is part of the request's digest, so every
  party must have asked for its triple on the same kind of device;
- the dealer answers only requests every party makes. Only party 0 talks to
  CrypTen's dealer, so a party 0 that deviates could ask for triples nobody else
  uses and read the other parties' next stream values off the answers (an empty
  matmul returns minus their sum exactly), then subtract them from the next
  opening. Here every other party sends the dealer a digest of each request it
  makes (:func:`announcing`, a send nobody waits on), and the dealer serves a
  request only when all digests match party 0's. A party owes its digest the moment
  it makes the request, whatever the others do, so a digest that does not come names
  the party that stalled: the dealer gives up on it, and tells party 0, waiting for
  the answer, whose it was (:func:`request`), so both name it.

Prefetching (:func:`prefetched`, the job's ``runtime.prefetch``): the dealer's requests
depend only on public shapes, so every party records the requests of a unit of work
(a training step) and, for each later unit with the same key, party 0 asks for the
recorded list in one ``batch`` request, or, where it is too large for one, in segments
of at most ``SEGMENT_ELEMENTS``, while the others announce one digest of each. A
segment is asked for when the unit takes the first item of the one before it (the
parties know each batch's size from its items, so the dealer sends none; party 0 posts
its receive as it asks, and the answer ends in the batch's digest, which it checks):
the dealer computes a segment while the parties use the previous one. The dealer checks every
item as it would a single request, caps the batch's size, serves it only if the
digests match, and computes the items in order: each party's stream is drawn in the
order the party draws it later. Party 0 then takes each answer from its queue. A
request that differs from the next recorded item (every honest party sees the same
difference) first drains the rest of the queue (the segments asked for) on every
party, drawing each item's stream values as if it had been used, so the streams stay
in step with the dealer's; the segments not asked for are dropped; then it goes to
the dealer as usual.
Every triple is still covered by a digest of every party: the dealer's trust model
is unchanged.

Fixed masks (:mod:`mpcfl.mpc.fixed_mask`, mask reuse on fixed data): a ``fixed_mask``
request, bound to a public identifier of one data tensor, makes every party draw its
share of a mask A from its stream, as for a triple's first factor; the dealer draws the
same values, keeps A under that identifier and answers nothing of it. Each later
``fixed_triple`` for that identifier is a triple (A, B, A·B) or (Aᵀ, B, Aᵀ·B) with a
fresh B: the parties draw B (and parties 1..n-1 their share of the product) and party 0
gets its share of the product, as for ``additive``; a ``fixed_triple`` that names a drawer (a rank)
has that party alone draw B (a one-sided product: the other holds the fixed tensor in plaintext, and
its share of B is 0). The dealer registers an identifier
once (a second mask for the same data is refused, and a registration never goes in a
batch), and serves triples only for a registered identifier and the size it was
registered with. A ``fixed_release`` (alone, never in a batch) makes it forget a registered
mask: a served model's masks last one ``secure_predict`` call (or one ``mpcfl.serve`` server), and
the next registers fresh ones under the same identifiers. It sees neither the data nor any share of it, and never the opened
difference X - A: it knows A, so that would be X.

Truncation pairs (:mod:`mpcfl.mpc.truncation`, the job's ``runtime.truncation``): a
``truncation`` request (a size and a public divisor d in [2, 2^62]) makes every party draw
its share of a uniform r, then of floor(r / d) and of r's top bit (r read unsigned); the
dealer draws the same r and answers party 0 its shares of the last two. It deals randomness
only: the parties open x + r among themselves, never to it.
"""

from mpcfl.mpc.providers.ttp.party import (
    PARTY_EXTENSIONS,
    announce_quiet,
    announcing,
    forget_session,
    prefetched,
    receive_dealer_key,
    request,
)
from mpcfl.mpc.providers.ttp.requests import (
    ABORT,
    PARTY_METHODS,
    PRODUCTS,
    DealerRequestRefused,
    answer_size,
    batch_digest,
    request_digest,
)
from mpcfl.mpc.providers.ttp.server import Dealer

# What mpcfl.mpc.compat installs, mpcfl.mpc.session calls and the tests check, from one place.
__all__ = [
    "ABORT", "PARTY_EXTENSIONS", "PARTY_METHODS", "PRODUCTS", "Dealer", "DealerRequestRefused", "announce_quiet",
    "announcing", "answer_size", "batch_digest", "forget_session", "prefetched", "receive_dealer_key", "request",
    "request_digest",
]
