"""Privacy audit: membership-inference attacks on a revealed model.

Given a training job and the model a receiver saved, the auditor asks how well an
attacker holding the model can tell the training records (members) from the
held-out ones (non-members):

- **loss threshold** (Yeom et al., 2018): a record with a low loss is guessed a member;
- **shadow models, LiRA-style** (Carlini et al., 2022): shadow models trained in
  plaintext, the same way, on random halves of all the records give, for each record,
  the distribution of its model confidence when it was in the training set and when
  it was not; the score is the likelihood ratio of the target model's confidence.

For each attack it reports the ROC AUC, the TPR at 1% and 0.1% FPR, and an empirical
lower bound on epsilon: the largest ln((TPR_low - delta) / FPR_high) over thresholds,
with Clopper-Pearson 95% bounds on both rates, so the bound holds with that
confidence for any (epsilon, delta)-DP training.

The auditor reads every party's files: it is a measurement on data you may pool,
never part of a secure run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from mpcfl.tasks.train.baseline import prepared_data, run_center, train_plaintext
from mpcfl.jobs.schema import TrainJob
from mpcfl.errors import MpcflError
from mpcfl.models.build import build_torch_model
from mpcfl.models.heads import job_head
from mpcfl.outputs import atomic_write, write_json

log = logging.getLogger(__name__)

#: What :func:`audit` writes beside the model.
AUDIT_JSON, AUDIT_ROC = "audit.json", "audit_roc.png"
#: LiRA needs this many shadow models to run at all, and this many for an AUC that is more than noise.
MIN_SHADOWS, ENOUGH_SHADOWS = 4, 16


def check_shadows(shadows: int) -> str | None:
    """A warning to show for a LiRA attack from too few shadow models, if any.

    Raises:
        MpcflError: naming ``--shadows``: negative, or too few to run LiRA (0 skips it).
    """
    if shadows < 0 or 0 < shadows < MIN_SHADOWS:
        raise MpcflError(f"--shadows: {shadows}: LiRA needs at least {MIN_SHADOWS} shadow models (0 skips it)")
    if 0 < shadows < ENOUGH_SHADOWS:
        return (f"--shadows {shadows}: a LiRA AUC from fewer than {ENOUGH_SHADOWS} shadow models is noise; "
                f"use {ENOUGH_SHADOWS} or more for a figure to rely on")
    return None


@dataclass(frozen=True)
class AttackResult:
    name: str
    auc: float
    tpr_at_1pct: float
    tpr_at_01pct: float
    epsilon_lower_bound: float
    members: int
    non_members: int
    fpr: np.ndarray
    tpr: np.ndarray

    def summary(self) -> dict[str, float]:
        return {
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct,
            "tpr_at_0.1pct_fpr": self.tpr_at_01pct,
            "epsilon_lower_bound": self.epsilon_lower_bound,
        }


def _confidence(job: TrainJob, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example logit-scaled confidence in the true label, log(p / (1 - p)) (LiRA's statistic)."""
    with torch.no_grad():
        return job_head(job).log_odds(model(x), y).numpy()


def _loss(job: TrainJob, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        loss = job_head(job).plain_loss(model(x), y, reduction="none")
    return loss.reshape(len(x)).double().numpy()


def roc(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates, and the counts behind them, at every threshold (high score = member)."""
    order = np.argsort(-scores, kind="stable")
    hits = members[order].astype(np.int64)
    tp = np.concatenate([[0], np.cumsum(hits)])
    fp = np.concatenate([[0], np.cumsum(1 - hits)])
    return fp / max(fp[-1], 1), tp / max(tp[-1], 1), fp, tp


def epsilon_lower_bound(fp: np.ndarray, tp: np.ndarray, *, delta: float, confidence: float = 0.95) -> float:
    """max over thresholds of ln((TPR_low - delta) / FPR_high), with Clopper-Pearson bounds."""
    negatives, positives = int(fp[-1]), int(tp[-1])
    alpha = (1 - confidence) / 2
    tpr_low = np.where(tp > 0, stats.beta.ppf(alpha, np.maximum(tp, 1), positives - tp + 1), 0.0)
    fpr_high = np.where(fp < negatives, stats.beta.ppf(1 - alpha, fp + 1, np.maximum(negatives - fp, 1)), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.log((tpr_low - delta) / fpr_high)
    bounds = bounds[np.isfinite(bounds)]
    return float(max(0.0, bounds.max())) if bounds.size else 0.0


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    within = tpr[fpr <= target]
    return float(within.max()) if within.size else 0.0


def evaluate_attack(name: str, scores: np.ndarray, members: np.ndarray, *, delta: float) -> AttackResult:
    fpr, tpr, fp, tp = roc(scores, members)
    auc = float(np.trapezoid(tpr, fpr))
    return AttackResult(
        name=name,
        auc=auc,
        tpr_at_1pct=_tpr_at(fpr, tpr, 0.01),
        tpr_at_01pct=_tpr_at(fpr, tpr, 0.001),
        epsilon_lower_bound=epsilon_lower_bound(fp, tp, delta=delta),
        members=int(tp[-1]),
        non_members=int(fp[-1]),
        fpr=fpr,
        tpr=tpr,
    )


@dataclass(frozen=True)
class SubsetModels:
    """Models trained on random subsets of the same records, and what each says about every record."""

    confidences: np.ndarray  # (models, records): LiRA's statistic
    losses: np.ndarray  # (models, records)
    included: np.ndarray  # (models, records): whether that model trained on that record
    accuracies: np.ndarray  # (models,): accuracy on the records it did not train on


def train_on_subsets(job: TrainJob, x: torch.Tensor, y: torch.Tensor, *, models: int, size: int, seed: int) -> SubsetModels:
    """Trains ``models`` models the job's way (DP-SGD when it has DP), each on ``size`` random records."""
    rng = np.random.default_rng(seed)
    n = len(x)
    confidences, losses = np.zeros((models, n)), np.zeros((models, n))
    included = np.zeros((models, n), dtype=bool)
    accuracies = np.zeros(models)
    head = job_head(job)
    for s in range(models):
        keep = rng.permutation(n)[:size]
        included[s, keep] = True
        index = torch.from_numpy(keep)
        model = train_plaintext(job, data=(x[index], y[index], None, None), seed=int(rng.integers(2**31))).model
        confidences[s] = _confidence(job, model, x, y)
        losses[s] = _loss(job, model, x, y)
        out = torch.from_numpy(~included[s])
        with torch.no_grad():
            accuracies[s] = float(head.plain_hits(model(x[out]), y[out]).float().mean())
    return SubsetModels(confidences, losses, included, accuracies)


def pooled_attacks(trained: SubsetModels, *, delta: float) -> list[AttackResult]:
    """Both attacks with each model in turn the target and the others its shadows, scores pooled.

    Pooling over targets multiplies the non-members, so low FPRs can be resolved, but the
    scores are not independent (the same records, models on overlapping subsets): treat the
    Clopper-Pearson bounds as approximate.
    """
    models = len(trained.included)
    loss_scores, lira, members = [], [], []
    for target in range(models):
        shadows = np.arange(models) != target
        loss_scores.append(-trained.losses[target])
        lira.append(lira_scores(trained.confidences[target], trained.confidences[shadows], trained.included[shadows]))
        members.append(trained.included[target])
    truth = np.concatenate(members)
    return [
        evaluate_attack("loss threshold", np.concatenate(loss_scores), truth, delta=delta),
        evaluate_attack(f"LiRA ({models - 1} shadows)", np.concatenate(lira), truth, delta=delta),
    ]


def lira_scores(target: np.ndarray, confidences: np.ndarray, included: np.ndarray) -> np.ndarray:
    """Online LiRA: log N(c; mu_in, s_in) - log N(c; mu_out, s_out) per record."""
    scores = np.zeros(target.shape[0])
    for i in range(target.shape[0]):
        inside, outside = confidences[included[:, i], i], confidences[~included[:, i], i]
        if inside.size < 2 or outside.size < 2:
            continue
        spread = max(np.sqrt((inside.var() + outside.var()) / 2), 1e-6)  # pooled: few shadows per side
        scores[i] = stats.norm.logpdf(target[i], inside.mean(), spread) - stats.norm.logpdf(target[i], outside.mean(), spread)
    return scores


def run_attacks(job: TrainJob, model_path: Path, *, shadows: int = 16, seed: int = 0) -> list[AttackResult]:
    """Both attacks on the model at ``model_path``: train rows are members, test rows are not.

    Raises:
        MpcflError: no model file, the job has no test split to serve as non-members, or it is a regression.
    """
    if job.regression is not None:  # LiRA here scores a classifier's log-odds of the true label
        raise MpcflError(f"{job.source}: the membership audit scores classifiers; a regression (training.loss: {job.training.loss}) is not audited yet")
    if not model_path.is_file():
        raise MpcflError(f"{model_path}: no model to audit (run the job with outputs.model_to naming a party)")
    x, y, x_test, y_test = prepared_data(job, center=run_center(job, model_path.parent.name))
    if x_test is None:
        raise MpcflError(f"{job.source}: the audit needs test files as non-members")
    model = build_torch_model(job.model, n_features=x.shape[1])
    model.load_state_dict(torch.load(model_path, weights_only=True))
    x_all, y_all = torch.cat([x, x_test]), torch.cat([y, y_test])
    members = np.concatenate([np.ones(len(x), dtype=bool), np.zeros(len(x_test), dtype=bool)])
    delta = job.dp.delta if job.dp is not None else 1e-5
    results = [evaluate_attack("loss threshold", -_loss(job, model, x_all, y_all), members, delta=delta)]
    if shadows >= MIN_SHADOWS:
        trained = train_on_subsets(job, x_all, y_all, models=shadows, size=len(x_all) // 2, seed=seed)
        target = _confidence(job, model, x_all, y_all)
        scores = lira_scores(target, trained.confidences, trained.included)
        results.append(evaluate_attack(f"LiRA ({shadows} shadows)", scores, members, delta=delta))
    return results


def audit(job: TrainJob, model_path: Path, *, shadows: int = 16, seed: int = 0) -> dict[str, Any]:
    """Runs :func:`run_attacks` and writes ``audit.json`` and ``audit_roc.png`` beside the model."""
    results = run_attacks(job, model_path, shadows=shadows, seed=seed)
    report = {
        "job": job.name,
        "model": str(model_path),
        "members": results[0].members,
        "non_members": results[0].non_members,
        "dp": None if job.dp is None else {"epsilon": job.dp.epsilon, "delta": job.dp.delta},
        "attacks": {r.name: r.summary() for r in results},
    }
    write_json(model_path.parent / AUDIT_JSON, report)
    plot_roc(model_path.parent / AUDIT_ROC, {"": results}, title=f"{job.name}: membership inference")
    return report


def plot_roc(path: Path, groups: dict[str, list[AttackResult]], *, title: str) -> None:
    """A log-log ROC plot of attacks; ``groups`` labels sets of results (e.g. per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    floor = 1e-3
    for group, results in groups.items():
        for result in results:
            label = f"{group}{': ' if group else ''}{result.name} (AUC {result.auc:.3f})"
            ax.plot(np.maximum(result.fpr, floor), np.maximum(result.tpr, floor), label=label)
    ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(fig)


def print_report(report: dict[str, Any]) -> None:
    privacy = "no DP" if report["dp"] is None else f"DP epsilon {report['dp']['epsilon']:g}"
    print(f"{report['job']} ({privacy}): {report['members']} members, {report['non_members']} non-members")
    print("| attack | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | empirical epsilon lower bound |")
    print("|---|---|---|---|---|")
    for name, r in report["attacks"].items():
        print(f"| {name} | {r['auc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | {r['tpr_at_0.1pct_fpr']:.3f} | {r['epsilon_lower_bound']:.2f} |")
    folder = Path(report["model"]).parent
    print(f"wrote {folder / AUDIT_JSON} and {folder / AUDIT_ROC}")
