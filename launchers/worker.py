#!/usr/bin/env python3
"""One process of a job under torchrun or Slurm; its rank picks the role (rank n = the dealer).

    torchrun --standalone --nproc-per-node 3 launchers/worker.py configs/breast_cancer_lr.yaml
    srun --ntasks 3 python launchers/worker.py configs/breast_cancer_lr.yaml   # with MASTER_ADDR/PORT exported

Every process needs the same job secret in MPCFL_JOB_SECRET (or runtime.secret_file).
"""

import sys

from mpcfl.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
