"""prefetch_triples.py with every recording cut as if too large for one batch, and every request a
segment of its own (``SEGMENT_ELEMENTS = 1``): each segment
is asked for as the one before it starts being used, so the exact checks cover the dealer computing
ahead of the parties, a deviation that drops the segments never asked for, and drains of one that was.
"""

import runpy
from pathlib import Path

from mpcfl.mpc.providers.ttp import party

party.SEGMENT_ELEMENTS = 1
party._fits = lambda items: False
runpy.run_path(str(Path(__file__).with_name("prefetch_triples.py")), run_name="__main__")
