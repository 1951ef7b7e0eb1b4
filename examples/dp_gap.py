"""Where DP's accuracy gap lies on the breast-cancer demo: held-out folds of the training rows
against the demo's own test patients, on mpcfl's plaintext replica of DP-SGD.

    python examples/dp_gap.py [--sampling poisson,poisson+dealer,poisson+clip,poisson+clip+dealer]
                              [--epsilon 1] [--splits 20] [--seeds 5] [--test-seeds 30]

For each of examples/dp_utility.py's settings (the same jobs), at ``--epsilon`` and without DP:
the mean accuracy over ``--splits`` random 80/20 splits of the 456 training rows (``--seeds``
training seeds each, the noise calibrated to the fold's own row count), and the median over
``--test-seeds`` seeds of the test accuracy on the demo's 113 held-out patients. The replica is
``mpcfl.tasks.train.baseline.train_plaintext`` (``mpcfl baseline``'s mechanism: the same clipping,
noise, Poisson batches and error clamp, in plaintext): a measurement that reads every party's
files, outside any budget. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np

from dp_utility import job_file  # this folder's: the same jobs as the secure measurement
from mpcfl.jobs.schema import TrainJob, load_job
from mpcfl.tasks.train.baseline import prepared_data, train_plaintext


class Prepared:
    """A job's prepared data, read once; under ``dp.center``, centred afresh for each seed (its noise)."""

    def __init__(self, job: TrainJob) -> None:
        self.job, self.fixed = job, prepared_data(job)
        self.centred = job.dp is not None and job.dp.center is not None

    def __call__(self, seed: int) -> tuple:
        return prepared_data(self.job, seed=seed) if self.centred else self.fixed


def folds_accuracy(job: TrainJob, data: Prepared, splits: int, seeds: int) -> float:
    """Mean validation accuracy over random 80/20 splits of the training rows of ``data`` (the job's
    prepared data; a ``dp.center`` mean is taken over all of them, the held-out fifth's features included)."""
    order = np.random.default_rng(0)
    rows_of = [order.permutation(len(data(0)[0])) for _ in range(splits)]
    scores = []
    for seed in range(seeds):
        x, y, _, _ = data(seed)
        cut = round(0.8 * len(x))
        for rows in rows_of:
            fold = (x[rows[:cut]], y[rows[:cut]], x[rows[cut:]], y[rows[cut:]])
            scores.append(train_plaintext(job, data=fold, seed=seed).history[-1]["test_accuracy"])
    return statistics.fmean(scores)


def test_median(job: TrainJob, data: Prepared, seeds: int) -> float:
    """Median test accuracy on the demo's held-out patients over training seeds 0, 1, ..."""
    return statistics.median(train_plaintext(job, data=data(seed), seed=seed).history[-1]["test_accuracy"] for seed in range(seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampling", default="poisson,poisson+dealer,poisson+clip,poisson+clip+dealer",
                        help="comma-separated settings of examples/dp_utility.py")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--test-seeds", type=int, default=30)
    args = parser.parse_args()
    print(f"| setting | folds of the training rows, epsilon {args.epsilon:g} | without DP | gap "
          f"| demo's test patients, epsilon {args.epsilon:g} | without DP | gap |")
    print("|---|---|---|---|---|---|---|")
    for sampling in args.sampling.split(","):
        dp, plain = (load_job(job_file(sampling, epsilon, 0)) for epsilon in (args.epsilon, math.inf))
        data = [Prepared(job) for job in (dp, plain)]
        folds = [folds_accuracy(job, d, args.splits, args.seeds) for job, d in zip((dp, plain), data)]
        test = [test_median(job, d, args.test_seeds) for job, d in zip((dp, plain), data)]
        print(f"| {sampling} | {folds[0]:.2%} | {folds[1]:.2%} | {100 * (folds[1] - folds[0]):.2f} "
              f"| {test[0]:.2%} | {test[1]:.2%} | {100 * (test[1] - test[0]):.2f} |", flush=True)


if __name__ == "__main__":
    main()
