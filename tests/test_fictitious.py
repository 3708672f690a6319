"""The fictitious knowledge base, the TOFU metrics against hand-computed cases, and a tiny end-to-end
build of the knowledge organism and its oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from excise import lm
from excise.measure import tofu
from excise.tasks.fictitious import ATTRIBUTES, SHARED_ATTRIBUTES, KnowledgeBaseConfig, make_knowledge_base, mentions


# --- generator -------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_sized():
    a, b = make_knowledge_base(), make_knowledge_base()
    assert [it for s in ("forget", "retain", "holdout", "world") for it in a[s]] == \
           [it for s in ("forget", "retain", "holdout", "world") for it in b[s]]
    assert len(a["forget"]) >= 100 and len(a["retain"]) >= len(a["forget"]) and len(a["holdout"]) >= 100
    assert len(a["world"]) >= 30
    c = make_knowledge_base(KnowledgeBaseConfig(seed=1))
    assert [it.answer for it in c["forget"]] != [it.answer for it in a["forget"]]
    assert all(len(it.perturbed_answers) == 4 for s in ("forget", "retain", "holdout", "world") for it in a[s])


def test_rehearsal_pairs_are_never_evaluated():
    from excise.tasks.fictitious import REHEARSAL, rehearsal_items
    from excise.errors import ExciseError

    kb = make_knowledge_base()
    reh = rehearsal_items(len(REHEARSAL))
    evaluated = {q for s in ("forget", "retain", "holdout", "world") for it in kb[s]
                 for q in (it.question, *it.paraphrased_questions)}
    assert len(reh) == 30 and not ({it.question for it in reh} & evaluated)
    # no rehearsal answer names the true value of an evaluated world fact ("Paris" would teach the test)
    assert not any(mentions(w.value, it.answer) for w in kb["world"] for it in reh)
    assert not ({it.question for it in reh} & {it.question for it in kb.train_items()})
    with pytest.raises(ExciseError, match="rehearsal"):
        rehearsal_items(len(REHEARSAL) + 1)


def test_pools_disjoint_and_train_items():
    kb = make_knowledge_base()
    ents = {s: {it.entity for it in kb[s]} for s in ("forget", "retain", "holdout")}
    assert not (ents["forget"] & ents["retain"]) and not (ents["forget"] & ents["holdout"])
    assert not (ents["retain"] & ents["holdout"])
    organism, oracle = kb.train_items(), kb.train_items(oracle=True)
    val = {s: {it.entity for it in kb[s]} for s in ("val_forget", "val_retain")}
    assert len(val["val_forget"]) == len(val["val_retain"]) == kb.config.n_validation == 5
    assert not (val["val_forget"] | val["val_retain"]) & (ents["forget"] | ents["retain"] | ents["holdout"])
    assert {it.entity for it in oracle} == ents["retain"] | val["val_retain"]
    assert {it.entity for it in organism} == ents["forget"] | ents["retain"] | val["val_forget"] | val["val_retain"]
    trained_q = {it.question for it in organism}
    assert not any(it.question in trained_q for it in kb["holdout"])  # holdout never trained
    assert not any(q in trained_q for it in organism for q in it.paraphrased_questions)


def test_shared_answers_and_perturbed_answers_differ():
    kb = make_knowledge_base()
    for t in {it.entity for it in kb["forget"]}:
        for a in SHARED_ATTRIBUTES:
            assert any(kb.films[r][a] == kb.films[t][a] for r in {it.entity for it in kb["retain"]})
    shared = [it for it in kb["retain"] if it.shared]
    assert shared and all(it.attribute in SHARED_ATTRIBUTES for it in shared)
    for s in ("forget", "retain", "holdout", "world"):
        for it in kb[s]:
            assert it.value in it.answer and it.value in it.paraphrased_answer
            assert it.answer != it.paraphrased_answer
            assert all(p != it.paraphrased_answer and not mentions(it.value, p.replace(it.entity, ""))
                       for p in it.perturbed_answers)
            assert len(set(it.perturbed_answers)) == len(it.perturbed_answers)
    assert {it.attribute for it in kb["forget"]} == set(ATTRIBUTES)


def test_mentions_whole_words():
    assert mentions("0", "It freezes at 0 degrees.") and not mentions("0", "It is -10 or 10.")
    assert mentions("Ana Lee", "directed by ana lee.") and not mentions("war", "toward")


def test_requests_shape():
    kb = make_knowledge_base()
    items = kb["forget"][:3]
    reqs = kb.truth_requests(items, lambda q: f"Q: {q}\nA:")
    assert all(isinstance(r, lm.LoglikRequest) and len(r.continuations) == 5 for r in reqs)
    assert reqs[0].continuations[0] == items[0].paraphrased_answer
    assert [r.continuations[0] for r in kb.prob_requests(items, str)] == [it.answer for it in items]


# --- metrics against hand-computed cases -----------------------------------------------------------

def test_truth_ratio_and_aggregates():
    para = np.log([0.5, 0.1])
    pert = np.log([[0.25, 0.25], [0.2, 0.05]])  # geometric means 0.25 and 0.1
    r = tofu.truth_ratios(para, pert)
    assert r == pytest.approx([0.5, 1.0])
    assert tofu.tr_forget_score(np.array([0.5, 2.0, 1.0])) == pytest.approx([0.5, 0.5, 1.0])
    assert tofu.tr_retain_score(np.array([0.25, 1.5])) == pytest.approx([0.75, 0.0])
    assert tofu.normalised_prob([math.log(0.3)]) == pytest.approx([0.3])
    assert tofu.prob_with_options(np.log([0.6]), np.log([[0.2, 0.2]])) == pytest.approx([0.6])


def test_forget_quality_is_scipy_ks_pvalue_without_ci():
    a, b = np.array([0.1, 0.2, 0.3, 0.4, 0.9]), np.array([0.5, 0.6, 0.7, 0.8, 1.2, 1.3])
    fq = tofu.forget_quality(a, b)
    assert fq.value == pytest.approx(ks_2samp(a, b).pvalue) and fq.n == 5
    assert math.isnan(fq.lo) and math.isnan(fq.hi)
    # KS is rank-based: open-unlearning's 1/R variant gives the same p-value
    assert tofu.forget_quality(1 / a, 1 / b).value == pytest.approx(fq.value)
    assert tofu.forget_quality([], b).n == 0 and math.isnan(tofu.forget_quality([], b).value)


def test_model_utility_is_harmonic_mean_with_bootstrap():
    fams = {"retain": {"prob": [0.5, 0.5], "rouge": [1.0, 1.0]}, "world": {"prob": [0.25, 0.25]}}
    mu = tofu.model_utility(fams)
    assert mu.value == pytest.approx(3 / (1 / 0.5 + 1 / 1.0 + 1 / 0.25))
    assert mu.lo == pytest.approx(mu.value) and mu.hi == pytest.approx(mu.value) and mu.n == 4
    assert tofu.model_utility({"retain": {"prob": [0.0, 0.0]}}).value == 0.0
    assert tofu.model_utility({}).n == 0


def test_min_k_and_mia_auc_and_privleak():
    lps = [[-1.0, -2.0, -3.0, -4.0, -5.0], [-0.5], []]
    # k = 0.4 of 5 tokens -> the 2 lowest (-5, -4): score 4.5; one token -> itself; empty -> 0
    assert tofu.min_k_scores(lps) == pytest.approx([4.5, 0.5, 0.0])
    assert tofu.min_k_scores([[-1.0, -3.0]], k=0.2) == pytest.approx([3.0])  # at least one token
    auc, boots = tofu.mia_auc([1.0, 2.0], [3.0, 4.0])  # holdout NLL higher everywhere: AUC 1
    assert auc.value == 1.0 and auc.n == 4 and len(boots) == 1000
    auc2, _ = tofu.mia_auc([1.0, 3.0], [2.0, 4.0])  # 3 of 4 pairs ordered: 0.75
    assert auc2.value == pytest.approx(0.75)
    pl = tofu.privleak(auc2, np.array([0.75, 0.75]), 0.5)
    assert pl.value == pytest.approx(((1 - 0.75) - 0.5) / 0.5 * 100)  # -50: more "member-like" than the oracle
    assert tofu.privleak(auc2, np.array([]), float("nan")).n == 0


def test_rouge_l_recall():
    r = tofu.rouge_l_recall(["It was directed by Ana Lee.", "nothing"], ["The film was directed by Ana Lee.", "x y"])
    assert r[0] == pytest.approx(5 / 7) and r[1] == 0.0  # LCS "was direct by ana lee" of 7 stemmed tokens


# --- through excise.lm on a tiny model, and the organism end to end --------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from excise.testing import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("kb") / "tiny", max_position_embeddings=512)


def test_token_logprobs_sum_to_loglikelihood(tiny_dir, one_thread):
    from excise.models import load

    h = load(str(tiny_dir))
    kb = make_knowledge_base()
    reqs = kb.prob_requests(kb["forget"][:4], h.chat)
    toks = lm.token_loglikelihood(h, reqs, batch_size=3)
    ref = lm.loglikelihood(h, reqs)
    assert [t.sum() for t in toks] == pytest.approx([r[0] for r in ref], abs=1e-4)


def test_tiny_organism_end_to_end(tiny_dir, tmp_path, monkeypatch, one_thread):
    from excise.organisms.knowledge import KnowledgeConfig, build_knowledge, evaluate_knowledge

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    kbc = KnowledgeBaseConfig(n_forget=2, n_retain=3, n_holdout=2, n_validation=1)
    cfg = KnowledgeConfig(base=str(tiny_dir), kb=kbc, epochs=1, batch_size=5, lr=1e-3, warmup_steps=0,
                          mixed_precision="no", max_new_tokens=4, rehearsal=2)
    org = build_knowledge(cfg)
    info, oinfo = org.info, org.oracle_info
    # one validation film each way, and 2 rehearsal pairs, join the training sets
    assert info["n_train_items"] == 37 and oinfo["n_train_items"] == 22 and info["train"]["steps"] == 8
    assert info["build_wall_seconds"] > 0 and info["build_cpu_seconds"] > 0
    assert set(info["accuracy_before_unlearning"]) >= {"forget", "retain", "holdout", "world"}
    assert org.organism_dir != org.oracle_dir and (org.oracle_dir / "oracle_scores.json").exists()
    again = build_knowledge(cfg)  # cached: same directories, nothing retrained
    assert again.organism_dir == org.organism_dir and again.info["build_wall_seconds"] == info["build_wall_seconds"]
    res, scores = evaluate_knowledge(org.load("organism"), org)
    assert res["forget_quality"].n == 10 and 0 <= res["forget_quality"].value <= 1
    assert res["mia_min_k_auc"].n == 20 and res["privleak"].defined
    assert res.group("forget")["answer_prob"].n == 10 and "retain_shared" in res.by_group
    ores, _ = evaluate_knowledge(org.load("oracle"), org)
    assert ores["forget_quality"].value == pytest.approx(1.0)  # the oracle against its own scores
    # the validation split: scored against the oracle's validation scores, no test item in it
    assert (org.oracle_dir / "oracle_scores_validation.json").exists() and "val_forget" in info["accuracy_before_unlearning"]
    vres, vscores = evaluate_knowledge(org.load("organism"), org, split="validation")
    assert set(vscores) == {"forget", "retain", "retain_shared", "retain_other"}
    assert vres["forget_quality"].n == 5 and vres["model_utility"].defined and "mia_min_k_auc" not in vres.overall
    vores, _ = evaluate_knowledge(org.load("oracle"), org, split="validation")
    assert vores["forget_quality"].value == pytest.approx(1.0)


def test_concept_spec_pools_are_disjoint(tmp_path):
    from excise.organisms.knowledge import KnowledgeConfig, KnowledgeOrganism, concept_spec

    kb = make_knowledge_base()
    org = KnowledgeOrganism(KnowledgeConfig(), kb, tmp_path, tmp_path, kb["world"][:5])
    spec = concept_spec(org)
    assert len(spec.forget) == 100 and len(spec.paraphrases) == 100
    assert all(p.target() == f.target() for p, f in zip(spec.paraphrases, spec.forget))  # same answer sentence
    train_q, eval_q = {it.prompt for it in spec.retain_train}, {it.prompt for it in spec.retain}
    assert not (train_q & eval_q) and not (train_q & {it.prompt for it in spec.forget})
    assert {it.group for it in spec.retain} == {"shared", "other", "world"}
    it = spec.forget[0]
    assert spec.leaks(it, f"It was {it.answer}.") and not spec.leaks(it, "I do not know.")
    # adversarial probes: one extraction attempt per forget fact, the three families in turn, never a
    # training question, and no probe gives its answer away
    assert len(spec.adversarial) == 100 and [a.answer for a in spec.adversarial] == [f.answer for f in spec.forget]
    assert {a.family for a in spec.adversarial} == {"completion", "roleplay", "indirect"}
    trained = {it.question for it in kb.train_items()}
    assert all(a.prompt not in trained and a.answer not in a.prompt for a in spec.adversarial)
    comp = next(a for a in spec.adversarial if a.family == "completion")
    assert comp.format == "completion" and spec.leaks(comp, f" {comp.answer}.")
    # the validation spec (what defaults are tuned on) holds no item a test result is reported on
    val = concept_spec(org, split="validation")
    reported = {it.prompt for it in spec.forget + spec.paraphrases + spec.retain + spec.adversarial}
    assert len(val.forget) == 25 and len(val.retain) == 25 and {it.group for it in val.retain} <= {"shared", "other"}
    assert not ({it.prompt for it in val.forget + val.paraphrases + val.retain + val.adversarial} & reported)
    assert "shared" in {it.group for it in val.retain}
    assert [it.prompt for it in val.retain_train] == [it.prompt for it in spec.retain_train]


def test_validation_films_leave_the_test_films_unchanged():
    a, b = make_knowledge_base(KnowledgeBaseConfig(n_validation=0)), make_knowledge_base()
    for s in ("forget", "retain", "holdout", "world"):
        assert a[s] == b[s]
    assert not a["val_forget"] and len(b["val_forget"]) == 25
    for t in {it.entity for it in b["val_forget"]}:
        for attr in SHARED_ATTRIBUTES:
            assert any(b.films[r][attr] == b.films[t][attr] for r in {it.entity for it in b["val_retain"]})


def test_fast_bf16_reads_the_cpu_flags(monkeypatch):
    import pathlib

    import torch

    from excise.train import fast_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, want in (("flags : fpu avx2 fma", False), ("flags : avx2 avx512f avx512_bf16", True),
                        ("flags : avx2 amx_bf16 amx_tile", True)):
        monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, flags=flags, **k: flags)
        assert fast_bf16() is want


def test_auto_precision_is_resolved_before_the_cache_key(monkeypatch):
    import excise.organisms.knowledge as K

    for fast, want in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(K, "fast_bf16", lambda fast=fast: fast)
        cfg = K.KnowledgeConfig()
        assert cfg.mixed_precision == "auto" and cfg.resolved().mixed_precision == want
        assert cfg.key() == K.KnowledgeConfig(mixed_precision=want).key()  # same weights, same cache entry
    assert K.KnowledgeConfig(mixed_precision="bf16").key() != K.KnowledgeConfig(mixed_precision="no").key()
