"""Membership-inference audit of the breast-cancer demo model, with and without DP.

    make demo && mpcfl run configs/breast_cancer_dp.yaml && python examples/audit_compare.py

Attacks the model hospital B received from each job (both read every party's
files: a measurement) and draws both ROC curves in docs/figures/audit_roc.png.
"""

from pathlib import Path

from mpcfl.tasks.train.audit import plot_roc, run_attacks
from mpcfl.jobs.schema import load_job

REPO = Path(__file__).resolve().parent.parent
JOBS = {"no DP": REPO / "configs" / "breast_cancer_lr.yaml", "DP eps 3": REPO / "configs" / "breast_cancer_dp.yaml"}

groups = {}
print("| model | attack | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | empirical epsilon lower bound |")
print("|---|---|---|---|---|---|")
for label, path in JOBS.items():
    job = load_job(path)
    groups[label] = run_attacks(job, job.party_root("hospital_b") / "latest" / "model.pt", shadows=32)
    for r in groups[label]:
        print(f"| {label} | {r.name} | {r.auc:.3f} | {r.tpr_at_1pct:.3f} | {r.tpr_at_01pct:.3f} | {r.epsilon_lower_bound:.2f} |")
plot_roc(REPO / "docs" / "figures" / "audit_roc.png", groups, title="breast cancer LR: membership inference")
