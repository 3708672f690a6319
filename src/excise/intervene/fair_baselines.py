"""The baselines a fairness user would pick instead of fair fine-tuning, on frozen-encoder embeddings.

Why these: a practitioner with an encoder and a protected attribute first tries a linear probe on
frozen embeddings (scikit-learn's ``LogisticRegression``), then Fairlearn's reductions
(``ExponentiatedGradient`` under an equalized-odds constraint, Agarwal et al. 2018) or its
post-processing (``ThresholdOptimizer`` with equalized odds, Hardt et al. 2016). excise reports
fair LoRA fine-tuning side by side with them on the same splits. Fairlearn's two methods are for
binary tasks; on a multiclass task they are skipped with that reason, never silently.

Features are cast to float64: ``ThresholdOptimizer.predict`` fails on float32 under pandas 3.x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from fairlearn.postprocessing import ThresholdOptimizer
from fairlearn.reductions import EqualizedOdds, ExponentiatedGradient
from pydantic import BaseModel, Field
from sklearn.linear_model import LogisticRegression

from excise.errors import ExciseError


class BaselineConfig(BaseModel):
    """Settings of the frozen-embedding baselines (scikit-learn / Fairlearn defaults unless noted)."""

    model_config = {"extra": "forbid"}
    C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic-regression head (sklearn default)")
    max_iter: int = Field(2000, ge=100, description="logistic-regression solver iterations (sklearn's 100 does not "
                                                   "converge on 384-d embeddings)")
    eg_eps: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.10],
                                description="ExponentiatedGradient allowed EO violations (Fairlearn default 0.01); "
                                            "several bounds trace its utility-fairness curve")
    to_objective: str = Field("balanced_accuracy_score", description="ThresholdOptimizer objective")
    seed: int = Field(0, description="seed of the randomized predictions (ExponentiatedGradient, ThresholdOptimizer)")


@dataclass
class BaselinePrediction:
    """One baseline's test predictions (``y_prob``: positive-class probability, or [N, C]; None if randomized)."""

    name: str
    y_pred: np.ndarray
    y_prob: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)


def _f64(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float64))


def logistic_probe(x_train: Any, y_train: Sequence[int], x_test: Any, cfg: BaselineConfig) -> tuple[Any, BaselinePrediction]:
    """The plain linear probe on frozen embeddings: (fitted estimator, test predictions)."""
    lr = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter, random_state=cfg.seed)
    lr.fit(_f64(x_train), np.asarray(y_train))
    prob = lr.predict_proba(_f64(x_test))
    prob = prob[:, 1] if prob.shape[1] == 2 else prob
    return lr, BaselinePrediction("frozen + logreg", lr.predict(_f64(x_test)), prob, {"C": cfg.C})


def exponentiated_gradient(x_train: Any, y_train: Sequence[int], g_train: Sequence[str], x_test: Any, eps: float,
                           cfg: BaselineConfig) -> BaselinePrediction:
    """Fairlearn's reduction under an equalized-odds constraint with violation bound ``eps`` (binary tasks)."""
    eg = ExponentiatedGradient(LogisticRegression(C=cfg.C, max_iter=cfg.max_iter, random_state=cfg.seed),
                               constraints=EqualizedOdds(difference_bound=eps))
    eg.fit(_f64(x_train), np.asarray(y_train), sensitive_features=np.asarray(g_train))
    # the randomized classifier's P(y = 1) (predict() samples it); float sums can leave [0, 1] by ~1e-16
    prob = np.clip(eg._pmf_predict(_f64(x_test))[:, 1], 0.0, 1.0)
    pred = (prob >= 0.5).astype(int)
    return BaselinePrediction(f"fairlearn ExponentiatedGradient (EO, eps={eps})", pred, prob,
                              {"eps": eps, "n_predictors": int(len(eg.predictors_))})


def threshold_optimizer(probe: Any, x_fit: Any, y_fit: Sequence[int], g_fit: Sequence[str], x_test: Any,
                        g_test: Sequence[str], cfg: BaselineConfig) -> BaselinePrediction:
    """Fairlearn's group-specific thresholds (equalized odds) on the fitted probe, fitted on ``x_fit`` (validation)."""
    to = ThresholdOptimizer(estimator=probe, constraints="equalized_odds", objective=cfg.to_objective, prefit=True,
                            predict_method="predict_proba")
    to.fit(_f64(x_fit), np.asarray(y_fit), sensitive_features=np.asarray(g_fit))
    pred = to.predict(_f64(x_test), sensitive_features=np.asarray(g_test), random_state=cfg.seed)
    return BaselinePrediction("fairlearn ThresholdOptimizer (EO)", np.asarray(pred).astype(int), None,
                              {"objective": cfg.to_objective, "fitted_on": "validation"})


def run_baselines(x_train: Any, y_train: Sequence[int], g_train: Sequence[str], x_val: Any, y_val: Sequence[int],
                  g_val: Sequence[str], x_test: Any, g_test: Sequence[str], cfg: BaselineConfig | None = None
                  ) -> tuple[list[BaselinePrediction], list[str]]:
    """Every baseline that applies to the task: (predictions, reasons for the ones skipped)."""
    cfg = cfg or BaselineConfig()
    n_classes = len(set(np.asarray(y_train).tolist()))
    if n_classes < 2:
        raise ExciseError("the training split holds one class: no classifier can be fitted")
    probe, first = logistic_probe(x_train, y_train, x_test, cfg)
    out, skipped = [first], []
    if n_classes == 2:
        out += [exponentiated_gradient(x_train, y_train, g_train, x_test, e, cfg) for e in cfg.eg_eps]
        out.append(threshold_optimizer(probe, x_val, y_val, g_val, x_test, g_test, cfg))
    else:
        skipped.append(f"Fairlearn's ExponentiatedGradient and ThresholdOptimizer take binary labels; this task has "
                       f"{n_classes} classes (use the binary framing to compare with them)")
    return out, skipped
