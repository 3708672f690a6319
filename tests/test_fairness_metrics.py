"""Fairness, calibration and counterfactual metrics: hand-computed cases, equality with Fairlearn and
scikit-learn on random data, undefined -> NaN with n = 0, multi-valued groups, seeded bootstrap CIs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate_difference,
    true_positive_rate_difference,
)
from scipy.special import expit, softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from excise.errors import ExciseError
from excise.measure.calibration import (
    apply_temperature,
    balanced_weights,
    calibration_curve_data,
    ece,
    temperature_scale,
    tune_threshold,
)
from excise.measure.counterfactual import cosine, counterfactual_matching
from excise.measure.fairness import fairness_report, kernel_for, shuffled_group_floor
from excise.measure.frame import GroupedResult
from excise.measure.stats import bootstrap, wilson

# --- a tiny binary case, every number by hand ---------------------------------------------------
#   group a: y 1 1 0 0, pred 1 0 1 0, prob .91 .42 .62 .12
#   group b: y 1 1 1 0, pred 1 1 0 0, prob .82 .72 .32 .22
Y = np.array([1, 1, 0, 0, 1, 1, 1, 0])
P = np.array([1, 0, 1, 0, 1, 1, 0, 0])
S = np.array([0.91, 0.42, 0.62, 0.12, 0.82, 0.72, 0.32, 0.22])
G = np.array(["a"] * 4 + ["b"] * 4)


def test_binary_hand_computed():
    r = fairness_report(Y, P, S, G, n_boot=0)
    a, b = r.group("a"), r.group("b")
    # a: selection 2/4, TPR 1/2, FPR 1/2, precision 1/2, accuracy 2/4, macro-F1 (1/2 + 1/2)/2
    assert (a["selection_rate"].value, a["tpr"].value, a["fpr"].value, a["precision"].value) == (0.5, 0.5, 0.5, 0.5)
    assert a["accuracy"].value == 0.5 and a["macro_f1"].value == pytest.approx(0.5)
    # b: selection 2/4, TPR 2/3, FPR 0/1, precision 2/2, accuracy 3/4, macro-F1 (4/5 + 2/3)/2
    assert b["selection_rate"].value == 0.5 and b["tpr"].value == pytest.approx(2 / 3)
    assert b["fpr"].value == 0 and b["precision"].value == 1 and b["accuracy"].value == 0.75
    assert b["macro_f1"].value == pytest.approx((0.8 + 2 / 3) / 2)
    # n is the rate's denominator
    assert (a["tpr"].n, b["tpr"].n, b["fpr"].n, b["precision"].n, b["accuracy"].n) == (2, 3, 1, 2, 4)
    # AUC a: positives .91 .42 vs negatives .62 .12 -> 3 of 4 pairs; b: every pair -> 1
    assert a["roc_auc"].value == pytest.approx(0.75) and b["roc_auc"].value == pytest.approx(1.0)
    # AP a: ranking pos, neg, pos, neg -> (1/1 + 2/3) / 2
    assert a["pr_auc"].value == pytest.approx((1 + 2 / 3) / 2) and b["pr_auc"].value == pytest.approx(1.0)
    # ECE (15 bins, every item alone in its bin): a (.09+.58+.62+.12)/4, b (.18+.28+.68+.22)/4
    assert a["ece"].value == pytest.approx(1.41 / 4) and b["ece"].value == pytest.approx(1.36 / 4)
    o = r.overall
    assert o["accuracy"].value == pytest.approx(5 / 8) and o["tpr"].value == pytest.approx(3 / 5)
    assert o["fpr"].value == pytest.approx(1 / 3) and o["ece"].value == pytest.approx(2.77 / 8)
    d = r.differences
    assert d["dp_diff"].value == 0 and d["dp_ratio"].value == 1
    assert d["tpr_gap"].value == pytest.approx(1 / 6) and d["fpr_gap"].value == pytest.approx(0.5)
    assert d["eo_diff"].value == pytest.approx(0.5) and d["pp_diff"].value == pytest.approx(0.5)
    assert d["accuracy_gap"].value == pytest.approx(0.25) and d["ece_gap"].value == pytest.approx(0.0125)
    assert d["roc_auc_gap"].value == pytest.approx(0.25)
    # Bias-in-Bios gaps, a - b: class 1 TPR 1/2 - 2/3; class 0 (TNR) 1/2 - 1/1
    assert d["tpr_gap[1]"].value == pytest.approx(-1 / 6) and d["tpr_gap[0]"].value == pytest.approx(-0.5)
    assert d["tpr_gap[1]"].n == 5 and "(a - b)" in d["tpr_gap[1]"].method
    assert d["tpr_gap_rms"].value == pytest.approx(math.sqrt((1 / 36 + 1 / 4) / 2))
    assert not d["tpr_gap_corr"].defined  # two classes: no correlation
    assert r.meta["group_sizes"] == {"a": 4, "b": 4} and r.meta["task"] == "binary"


def test_multiclass_hand_computed_bias_in_bios():
    # 3 classes; group F: class 0 all right, class 1 half, class 2 none; M: the reverse;
    # the last item (F, class 0) makes the share of F differ between classes
    y = np.array([0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 0])
    p = np.array([0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 2, 2, 0])
    g = np.array(["F"] * 6 + ["M"] * 6 + ["F"])
    r = fairness_report(y, p, None, g, label_names=["nurse", "writer", "pilot"], n_boot=0)
    d = r.differences
    # TPR F: nurse 3/3, writer 1/2, pilot 0/2; M: nurse 0/2, writer 1/2, pilot 2/2
    assert r.group("F")["tpr[nurse]"].value == 1 and r.group("M")["tpr[pilot]"].value == 1
    assert d["tpr_gap[nurse]"].value == 1 and d["tpr_gap[writer]"].value == 0 and d["tpr_gap[pilot]"].value == -1
    assert d["tpr_gap_rms"].value == pytest.approx(math.sqrt(2 / 3))
    # share of F: nurse 3/5, writer 1/2, pilot 1/2 -> r of (1, 0, -1) with (.6, .5, .5)
    assert d["tpr_gap_corr"].value == pytest.approx(np.corrcoef([1, 0, -1], [0.6, 0.5, 0.5])[0, 1])
    # one-vs-rest EO per class, mean and worst class, as Fairlearn's equalized_odds_difference
    eo = [equalized_odds_difference((y == c).astype(int), (p == c).astype(int), sensitive_features=g) for c in range(3)]
    assert d["eo_diff"].value == pytest.approx(np.mean(eo)) and d["eo_diff_max"].value == pytest.approx(max(eo))
    assert "roc_auc" not in r.overall and "ece" not in r.overall  # no probabilities: no AUC / ECE


def _random_binary(seed: int, n: int = 600, groups=("F", "M")):
    rng = np.random.default_rng(seed)
    g = rng.choice(groups, n)
    y = rng.integers(0, 2, n)
    s = np.clip(0.35 * y + 0.15 * (g == groups[0]) + rng.random(n) * 0.5, 0, 1).round(2)  # ties included
    return y, (s >= 0.5).astype(int), s, g


@pytest.mark.parametrize("groups", [("F", "M"), ("a", "b", "c", "d")])
def test_binary_equals_fairlearn_and_sklearn(groups):
    y, p, s, g = _random_binary(1, groups=groups)
    r = fairness_report(y, p, s, g, n_boot=0)
    d = r.differences
    assert d["dp_diff"].value == pytest.approx(demographic_parity_difference(y, p, sensitive_features=g))
    assert d["dp_ratio"].value == pytest.approx(demographic_parity_ratio(y, p, sensitive_features=g))
    assert d["eo_diff"].value == pytest.approx(equalized_odds_difference(y, p, sensitive_features=g))
    assert d["tpr_gap"].value == pytest.approx(true_positive_rate_difference(y, p, sensitive_features=g))
    assert d["fpr_gap"].value == pytest.approx(false_positive_rate_difference(y, p, sensitive_features=g))
    mf = MetricFrame(metrics={"precision": precision_score, "accuracy": accuracy_score}, y_true=y, y_pred=p,
                     sensitive_features=g)
    assert d["pp_diff"].value == pytest.approx(mf.difference()["precision"])
    assert d["accuracy_gap"].value == pytest.approx(mf.difference()["accuracy"])
    for name in groups:
        m = g == name
        grp = r.group(name)
        assert grp["precision"].value == pytest.approx(mf.by_group.loc[name, "precision"])
        assert grp["roc_auc"].value == pytest.approx(roc_auc_score(y[m], s[m]))
        assert grp["pr_auc"].value == pytest.approx(average_precision_score(y[m], s[m]))
        assert grp["macro_f1"].value == pytest.approx(f1_score(y[m], p[m], average="macro"))
        assert grp["accuracy"].n == int(m.sum())
    assert r.overall["roc_auc"].value == pytest.approx(roc_auc_score(y, s))
    assert r.overall["pr_auc"].value == pytest.approx(average_precision_score(y, s))
    if len(groups) > 2:  # multi-valued: unsigned max - min per class, no correlation
        tprs = [r.group(x)["tpr"].value for x in groups]
        assert d["tpr_gap[1]"].value == pytest.approx(max(tprs) - min(tprs))
        assert "max - min" in d["tpr_gap[1]"].method


def test_multiclass_equals_fairlearn_and_sklearn():
    rng = np.random.default_rng(2)
    n, c = 900, 4
    y = rng.integers(0, c, n)
    g = rng.choice(["F", "M", "X"], n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0
    logits[:, 0] += 0.8 * (g == "F")
    prob = softmax(logits, axis=1)
    p = prob.argmax(1)
    r = fairness_report(y, p, prob, g, n_boot=0)
    d = r.differences
    ovr = [((y == k).astype(int), (p == k).astype(int)) for k in range(c)]
    eo = [equalized_odds_difference(a, b, sensitive_features=g) for a, b in ovr]
    dp = [demographic_parity_difference(a, b, sensitive_features=g) for a, b in ovr]
    dpr = [demographic_parity_ratio(a, b, sensitive_features=g) for a, b in ovr]
    assert d["eo_diff"].value == pytest.approx(np.mean(eo)) and d["eo_diff_max"].value == pytest.approx(max(eo))
    assert d["dp_diff"].value == pytest.approx(np.mean(dp)) and d["dp_diff_max"].value == pytest.approx(max(dp))
    assert d["dp_ratio"].value == pytest.approx(np.mean(dpr)) and d["dp_ratio_min"].value == pytest.approx(min(dpr))
    assert r.overall["macro_f1"].value == pytest.approx(f1_score(y, p, average="macro"))
    assert r.overall["roc_auc"].value == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert r.overall["pr_auc"].value == pytest.approx(
        average_precision_score(label_binarize(y, classes=range(c)), prob, average="macro"))
    for name in ("F", "M", "X"):
        m = g == name
        assert r.group(name)["roc_auc"].value == pytest.approx(roc_auc_score(y[m], prob[m], multi_class="ovr"))
        mf = MetricFrame(metrics=precision_score, y_true=ovr[2][0], y_pred=ovr[2][1], sensitive_features=g)
        assert r.group(name)["precision[2]"].value == pytest.approx(mf.by_group[name])
    # top-label ECE per group, from sklearn's reliability bins
    m = g == "M"
    conf, correct = prob[m].max(1), (p[m] == y[m]).astype(float)
    bins = np.searchsorted(np.linspace(0, 1, 16)[1:-1], conf)
    want = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / m.sum()
    assert r.group("M")["ece"].value == pytest.approx(want)


def test_kernel_weights_equal_sklearn_sample_weight():
    """A resample is item weights: the kernel with integer weights equals sklearn with sample_weight."""
    y, p, s, g = _random_binary(3)
    k, names, _ = kernel_for(y, p, g, s)
    w = np.random.default_rng(0).integers(0, 4, y.size).astype(float)
    v = k.values(w)
    m = g == "F"
    assert v[("o", "roc_auc")] == pytest.approx(roc_auc_score(y, s, sample_weight=w))
    assert v[("o", "pr_auc")] == pytest.approx(average_precision_score(y, s, sample_weight=w))
    want = average_precision_score(y[m], s[m], sample_weight=w[m])
    assert v[("g", names.index("F"), "pr_auc")] == pytest.approx(want)
    assert v[("o", "accuracy")] == pytest.approx(accuracy_score(y, p, sample_weight=w))
    assert v[("d", "eo_diff")] == pytest.approx(equalized_odds_difference(y, p, sensitive_features=g, sample_weight=w))


def test_undefined_is_nan_with_n_zero():
    # group c has no positives: TPR undefined (n=0), never 0; the gap uses the groups where it is defined
    y = np.array([1, 0, 1, 0, 0, 0, 1, 1])
    p = np.array([1, 0, 0, 0, 1, 0, 1, 0])
    g = np.array(["a", "a", "b", "b", "c", "c", "a", "b"])
    r = fairness_report(y, p, None, g, n_boot=50)
    c = r.group("c")
    assert math.isnan(c["tpr"].value) and c["tpr"].n == 0 and str(c["tpr"]) == "undefined (n=0)"
    assert c["fpr"].value == 0.5 and c["fpr"].n == 2
    # TPR a 2/2, b 0/2, c undefined -> gap 1 - 0 over a and b
    assert r.group("a")["tpr"].value == 1 and r.group("b")["tpr"].value == 0
    assert r.differences["tpr_gap"].value == 1
    assert "tpr" in r.meta["undefined_in_groups"]["c"]
    # binary groups with one side undefined: the gap itself is undefined
    r2 = fairness_report(np.array([1, 0, 0, 0]), np.array([1, 0, 1, 0]), None, np.array(["F", "F", "M", "M"]),
                         n_boot=20)
    assert not r2.differences["tpr_gap"].defined and r2.differences["tpr_gap"].n == 0
    assert not r2.differences["eo_diff"].defined and r2.differences["fpr_gap"].defined
    # and it round-trips as JSON null
    back = GroupedResult.from_dict(r2.as_dict())
    assert not back.differences["eo_diff"].defined


def test_small_degenerate_data_never_crashes_and_undefined_means_n_zero():
    """Random tiny sets (missing classes, one-class groups, a single group, ties): the kernel agrees with
    Fairlearn / scikit-learn wherever they define a value (the report raises otherwise), and every cell
    is either defined with n > 0 or NaN with n = 0."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        n, c, k = int(rng.integers(3, 30)), int(rng.choice([2, 3, 5])), int(rng.integers(1, 4))
        y = rng.integers(0, c, n)
        p = rng.integers(0, c, n) if seed % 2 else y.copy()
        g = rng.choice([f"g{i}" for i in range(k)], n)
        prob = rng.random(n).round(1) if c == 2 else softmax(rng.normal(size=(n, c)), 1)
        r = fairness_report(y, p, prob if seed % 3 else None, g, n_boot=20, seed=seed)
        for scope in [r.overall, *r.by_group.values(), r.differences]:
            for e in scope.values():
                assert (e.n == 0) == math.isnan(e.value)


def test_bootstrap_ci_deterministic_and_equal_to_stats_bootstrap():
    y, p, s, g = _random_binary(4, n=300)
    r1 = fairness_report(y, p, s, g, n_boot=200, seed=7)
    r2 = fairness_report(y, p, s, g, n_boot=200, seed=7)
    r3 = fairness_report(y, p, s, g, n_boot=200, seed=8)
    assert r1.as_dict() == r2.as_dict()
    assert r1.differences["eo_diff"].lo != r3.differences["eo_diff"].lo
    e = r1.differences["eo_diff"]
    assert e.lo <= e.value <= e.hi
    # the same resamples and percentiles as stats.bootstrap over the library's statistic
    acc = bootstrap(np.arange(y.size), lambda i: accuracy_score(y[i], p[i]), n_boot=200, seed=7)
    assert (r1["accuracy"].lo, r1["accuracy"].hi) == pytest.approx((acc.lo, acc.hi))
    eo = bootstrap(np.arange(y.size), lambda i: equalized_odds_difference(y[i], p[i], sensitive_features=g[i]),
                   n_boot=30, seed=7)
    r4 = fairness_report(y, p, s, g, n_boot=30, seed=7)
    assert (r4.differences["eo_diff"].lo, r4.differences["eo_diff"].hi) == pytest.approx((eo.lo, eo.hi))


def test_bad_input_is_one_line_error():
    with pytest.raises(ExciseError, match="equally long"):
        fairness_report([0, 1], [0], None, ["a", "b"])
    with pytest.raises(ExciseError, match="class indices"):
        fairness_report([0, 3], [0, 1], np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"])
    with pytest.raises(ExciseError, match="integer"):
        fairness_report(["x", "y"], ["x", "y"], None, ["a", "b"])
    with pytest.raises(ExciseError, match="missing"):
        fairness_report([0, 1], [0, 1], None, ["a", None])
    with pytest.raises(ExciseError, match="gap_groups"):
        fairness_report([0, 1], [0, 1], None, ["a", "b"], gap_groups=("a", "z"))


def test_shuffled_group_floor():
    rng = np.random.default_rng(5)
    n = 800
    g = rng.choice(["F", "M"], n)
    y = rng.integers(0, 2, n)
    p_fair = np.where(rng.random(n) < 0.8, y, 1 - y)
    p_biased = np.where(g == "F", 1, p_fair)  # every F predicted positive
    fair = shuffled_group_floor(y, p_fair, g, "eo_diff", n_perm=100, seed=0)
    biased = shuffled_group_floor(y, p_biased, g, "eo_diff", n_perm=100, seed=0)
    assert fair == shuffled_group_floor(y, p_fair, g, "eo_diff", n_perm=100, seed=0)  # seeded
    assert biased.observed > biased.p95 and biased.p_value == pytest.approx(1 / 101)
    assert fair.p_value > 0.01 and 0 < fair.mean < fair.p95 < 0.2
    own = shuffled_group_floor(y, p_fair, g, lambda a, b, c: float(np.mean(b[c == "F"]) - np.mean(b[c == "M"])),
                               n_perm=50)
    assert own.n_perm == 50 and abs(own.mean) < 0.05
    with pytest.raises(ExciseError, match="unknown gap metric"):
        shuffled_group_floor(y, p_fair, g, "nope", n_perm=2)


# --- calibration ------------------------------------------------------------------------------------

def test_ece_hand_computed_and_curve():
    # bins of 1/15: .9 -> 13, .25 -> 3, .7 and .72 -> 10; |1-.9| + |0-.25| + |2-1.42| over 4 items
    y, prob = [1, 0, 1, 1], [0.9, 0.25, 0.7, 0.72]
    e = ece(y, prob, n_boot=0)
    assert e.value == pytest.approx(0.93 / 4) and e.n == 4
    curve = calibration_curve_data(y, prob)
    assert curve.count[10] == 2 and curve.accuracy[10] == 1 and curve.confidence[10] == pytest.approx(0.71)
    assert math.isnan(curve.confidence[0]) and curve.as_dict()["confidence"][0] is None
    assert curve.ece == pytest.approx(e.value)


def test_curve_equals_sklearn_and_calibrated_ece_near_zero():
    rng = np.random.default_rng(6)
    prob = rng.random(50_000)
    y = (rng.random(prob.size) < prob).astype(int)
    curve = calibration_curve_data(y, prob, n_bins=10)
    true, pred = calibration_curve(y, prob, n_bins=10)
    keep = np.array(curve.count) > 0
    assert np.allclose(np.array(curve.accuracy)[keep], true) and np.allclose(np.array(curve.confidence)[keep], pred)
    e = ece(y, prob, n_boot=100)
    assert e.value < 0.01 and e.lo <= e.value <= e.hi
    assert ece(y, np.clip(prob * 0.5 + 0.5, 0, 1), n_boot=0).value > 0.2  # miscalibrated
    # multiclass top-label: labels drawn from the predicted distribution
    logits = rng.normal(size=(20_000, 4)) * 2
    pm = softmax(logits, 1)
    ym = (pm.cumsum(1) < rng.random((pm.shape[0], 1))).sum(1)
    assert ece(ym, pm, n_boot=0).value < 0.02
    assert ece(ym, softmax(logits * 3, 1), n_boot=0).value > 0.1


def test_temperature_scaling_recovers_known_temperature():
    rng = np.random.default_rng(7)
    z = rng.normal(size=(20_000, 5)) * 2
    p = softmax(z, 1)
    y = (p.cumsum(1) < rng.random((z.shape[0], 1))).sum(1)
    t = temperature_scale(z * 2.5, y)  # an over-confident model: logits 2.5x the calibrated ones
    assert t == pytest.approx(2.5, rel=0.05) and t == temperature_scale(z * 2.5, y)
    assert np.allclose(apply_temperature(z * 2.5, t), softmax(z * 2.5 / t, 1))
    # binary, one logit per item, under-confident
    zb = rng.normal(size=20_000) * 2
    yb = (rng.random(zb.size) < expit(zb)).astype(int)
    assert temperature_scale(zb * 0.5, yb) == pytest.approx(0.5, rel=0.05)
    assert np.allclose(apply_temperature(zb, 2.0), expit(zb / 2))
    with pytest.raises(ExciseError):
        temperature_scale(z, y[:10])


def test_tune_threshold_hand_computed():
    y, prob = [0, 0, 1, 1, 1], [0.1, 0.4, 0.35, 0.8, 0.9]
    # F1 by how many of the distinct probabilities (descending) are positive: 0, .5, .8, .67, .857, .75
    assert tune_threshold(y, prob, metric="f1") == pytest.approx((0.1 + 0.35) / 2)
    # accuracy ties .8 at t in (.4, .8] and (.1, .35]: the midpoint nearer .5 wins
    assert tune_threshold(y, prob, metric="accuracy") == pytest.approx(0.6)
    # group-balanced: A (4 items) weighs 5/8 each, B (1 item) 5/2 -> predicting all positive is best
    y2, p2, g2 = [1, 0, 0, 0, 1], [0.6, 0.5, 0.5, 0.5, 0.3], ["A", "A", "A", "A", "B"]
    assert tune_threshold(y2, p2, metric="accuracy") == pytest.approx(0.55)
    assert tune_threshold(y2, p2, groups=g2, balanced=True, metric="accuracy") == pytest.approx(0.15)
    assert np.allclose(balanced_weights(g2), [0.625] * 4 + [2.5])
    with pytest.raises(ExciseError, match="needs groups"):
        tune_threshold(y2, p2, balanced=True)


def test_tune_threshold_is_best_on_a_grid():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 400)
    prob = np.clip(0.3 * y + rng.random(400) * 0.7, 0, 1)
    t = tune_threshold(y, prob)
    # every distinct probability (each possible cut) and a grid: none beats the tuned threshold
    cuts = np.concatenate([np.unique(prob), np.linspace(0, 1, 201)])
    best = max(f1_score(y, (prob >= x).astype(int), zero_division=0) for x in cuts)
    assert f1_score(y, (prob >= t).astype(int)) == pytest.approx(best)


# --- counterfactual matching ---------------------------------------------------------------------------

def test_counterfactual_matching_hand_computed():
    fem = np.array([[0.5, 0.4], [0.3, 0.6], [0.7, 0.2], [0.5, np.nan]])
    masc = np.array([[0.6, 0.4], [0.7, 0.6], [0.6, 0.2], [0.55, np.nan]])
    rel = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], bool)
    r = counterfactual_matching(fem, masc, relevant_mask=rel, groups=["x", "x", "y", "y"], n_boot=200, seed=1)
    # relevant gaps .1, .4, -.1, .05 -> mean .1125; masculine higher in 3 of 4
    assert r["cos_gap"].value == pytest.approx(0.1125) and r["cos_gap"].n == 4
    assert r["masc_higher"] == wilson(3, 4)
    assert r["cos_gap_nonrelevant"].value == pytest.approx(0) and r["masc_higher_nonrelevant"] == wilson(0, 3)
    # query 1's top document flips (.6 non-relevant vs .7 relevant); query 4 has one candidate
    assert r["flip_rate"] == wilson(1, 3)
    assert r.group("x")["cos_gap"].value == pytest.approx(0.25) and r.group("y")["flip_rate"] == wilson(0, 1)
    assert r.meta["ties"] == 0 and r.group_by == "category"
    again = counterfactual_matching(fem, masc, relevant_mask=rel, groups=["x", "x", "y", "y"], n_boot=200, seed=1)
    assert again.as_dict() == r.as_dict()
    one = counterfactual_matching(fem[:, 0], masc[:, 0])
    assert not one["flip_rate"].defined and one["cos_gap"].value == pytest.approx(0.1125)
    with pytest.raises(ExciseError, match="same places"):
        counterfactual_matching(fem, np.nan_to_num(masc))


def test_cosine():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]])
    got = cosine(a, b)
    assert got[0] == 0 and got[1] == pytest.approx(1) and math.isnan(got[2])
    q, docs = np.random.default_rng(0).normal(size=(3, 1, 8)), np.random.default_rng(1).normal(size=(3, 4, 8))
    full = cosine(q, docs)
    assert full.shape == (3, 4) and full[2, 1] == pytest.approx(
        q[2, 0] @ docs[2, 1] / np.linalg.norm(q[2, 0]) / np.linalg.norm(docs[2, 1]))
