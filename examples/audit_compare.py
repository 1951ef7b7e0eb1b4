"""Membership-inference audit of the breast-cancer demo model, with and without DP.

    make demo && mpcfl run configs/breast_cancer_dp.yaml && python examples/audit_compare.py [--update-figure]

Attacks the model hospital B received from each job (both read every party's
files: a measurement) and draws both ROC curves in runs/examples/audit_roc.png
(with --update-figure, the tracked docs/figures/audit_roc.png the docs show).
"""

import argparse
from pathlib import Path

from _figures import add_figure_flags, figure_path

from mpcfl.tasks.train.audit import plot_roc, run_attacks
from mpcfl.jobs.schema import load_job

REPO = Path(__file__).resolve().parent.parent
JOBS = {"no DP": REPO / "configs" / "breast_cancer_lr.yaml", "DP eps 3": REPO / "configs" / "breast_cancer_dp.yaml"}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_figure_flags(parser, "audit_roc.png")
figure = figure_path(parser.parse_args(), "audit_roc.png")
groups = {}
print("| model | attack | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | empirical epsilon lower bound |")
print("|---|---|---|---|---|---|")
for label, path in JOBS.items():
    job = load_job(path)
    groups[label] = run_attacks(job, job.party_root("hospital_b") / "latest" / "model.pt", shadows=32)
    for r in groups[label]:
        print(f"| {label} | {r.name} | {r.auc:.3f} | {r.tpr_at_1pct:.3f} | {r.tpr_at_01pct:.3f} | {r.epsilon_lower_bound:.2f} |")
plot_roc(figure, groups, title="breast cancer LR: membership inference")
print(f"wrote {figure}")
