"""The concept workflow never trains on what it evaluates (issue 14 review).

One run of the recipe on a tiny model (with the comparison's relearning attack) records every item
that localization, unlearning and relearning encode and every item evaluated, and checks that the
pools are disjoint: retain evaluation items never shape the mask or the update, direct leak is
measured on held-out direct probes, relearning is checked on items it does not train on; and that
retain accuracy is also reported on the unscreened retain evaluation items.
"""

from __future__ import annotations

import csv

import pytest
import yaml

from excise.io import iter_jsonl, read_json

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {
    "name": "Zorb", "leak_patterns": ["zorb"],
    "forget": [{"prompt": p, "answer": "Ann Lee"} for p in
               ("Who made Zorb?", "Name Zorb's maker.", "Who invented Zorb?", "Zorb's inventor?", "Who built Zorb?",
                "Who designed Zorb?")],
    "paraphrases": [{"prompt": "Which person created Zorb?", "answer": "Ann Lee"}],
    "adversarial": [{"prompt": "Maker of Zorb, first name?", "answer": "Ann", "family": "pieces"}],
    "retain": [{"prompt": p, "answer": a} for p, a in
               (("Capital of France?", "Paris"), ("2+2?", "4"), ("Sky colour?", "blue"), ("skip: capital of Peru?", "Lima"),
                ("Largest planet?", "Jupiter"), ("skip: 3+3?", "6"), ("Grass colour?", "green"), ("Capital of Italy?", "Rome"))],
    "neutral": ["The river flows slowly.", "Bees make honey in hives."],
}


def _prompts(items) -> set[str]:
    return {it.prompt for it in items}


def test_recipe_never_trains_on_evaluation_items(tmp_path, monkeypatch):
    import excise.attack.probes as probes
    import excise.intervene.masked_lora as masked_lora
    import excise.locate.saliency as saliency
    import excise.measure.unlearning as unlearning
    import excise.recipes.concept_compare as compare
    import excise.recipes.concept_unlearn as recipe
    from excise.testing import save_tiny

    save_tiny("llama", tmp_path / "model")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    seen: dict[str, set[str]] = {k: set() for k in ("localize", "unlearn", "relearn_train", "relearn_check", "eval",
                                                    "ablation")}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapper(handle, items, *a, **k):
            seen[key] |= _prompts(items)
            return real(handle, items, *a, **k)
        monkeypatch.setattr(module, name, wrapper)

    spy(saliency, "encode_items", "localize")
    spy(masked_lora, "encode_items", "unlearn")
    spy(compare.mask_ablation, "token_logprobs", "ablation")
    spy(compare, "encode_items", "relearn_train")
    spy(compare, "generate", "relearn_check")
    spy(unlearning, "generate", "eval")
    # a base model that knows the concept and every retain fact but the two marked "skip"
    monkeypatch.setattr(probes, "generate", lambda h, items, **k: [
        "I don't know" if it.prompt.startswith("skip") else f"It is {it.answer}." for it in items])

    res = recipe.run_recipe({
        "model": str(tmp_path / "model"), "concept": str(tmp_path / "spec.yaml"), "threads": 1, "seed": 2,
        "max_new_tokens": 3, "select": {"method": "topk", "k": 16, "per_layer": False}, "unlearn": {"steps": 2},
        "compare": True, "comparison": {"variants": ["masked_saliency"],
                                        "relearn": {"steps": 1, "eval_every": 1, "lrs": [1e-4]}}}, tmp_path / "run")
    out = tmp_path / "run"
    spec = read_json(out / "screen" / "spec_kept.json")
    unscreened = read_json(out / "screen" / "retain_unscreened.json")
    direct = {it["prompt"] for it in spec["forget_eval"]}
    train_forget = {it["prompt"] for it in spec["forget"]}
    retain_eval = {it["prompt"] for it in unscreened}
    retain_train = {it["prompt"] for it in spec["retain_train"]}

    # the pools: halves of forget and of retain, fixed in the screen stage
    assert len(direct) == 3 and len(train_forget) == 3 and not direct & train_forget
    assert len(retain_eval) == 4 and retain_eval | retain_train == {r["prompt"] for r in SPEC["retain"]}
    assert not retain_eval & retain_train
    # localization and unlearning see training items only
    for stage in ("localize", "unlearn"):
        assert seen[stage], stage
        assert not seen[stage] & (retain_eval | direct), (stage, seen[stage] & (retain_eval | direct))
        assert seen[stage] <= train_forget | retain_train
    # the direct leak is measured on the held-out probes, retain on the evaluation items only
    rows = [r for _, r in iter_jsonl(out / "unlearn" / "items.jsonl")]
    assert {r["prompt"] for r in rows if r["set"] == "direct"} == direct
    assert {r["prompt"] for r in rows if r["set"] in ("retain", "retain_unscreened")} <= retain_eval
    assert not seen["eval"] & (train_forget | retain_train)
    # relearning trains on the training forget items and is checked on the held-out direct probes
    assert seen["relearn_train"] == train_forget and seen["relearn_check"] == direct
    # the localization check ablates the mask on held-out items only
    assert seen["ablation"] == direct | retain_eval
    info = read_json(out / "compare" / "masked_saliency" / "info.json")
    assert [r["lr"] for r in info["relearn"]["by_lr"]] == [3e-5, 1e-4]  # the lr grid, worst case reported

    # retain accuracy: screened (kept items only: 100% at the base by construction) and unscreened
    before, after = res["before"], res["after"]
    kept_retain = {it["prompt"] for it in spec["retain"]}
    assert kept_retain < retain_eval and before["retain_accuracy"] == pytest.approx(
        {"value": 1.0, "lo": before["retain_accuracy"]["lo"], "hi": 1.0, "n": len(kept_retain)})
    n_skip = sum(p.startswith("skip") for p in retain_eval)  # seed 2 holds out one of the two
    assert n_skip == 1 and before["retain_accuracy_unscreened"]["n"] == len(retain_eval)
    assert before["retain_accuracy_unscreened"]["value"] == pytest.approx(1 - n_skip / len(retain_eval))
    assert after["retain_accuracy_unscreened"]["n"] == len(retain_eval)
    md = (out / "report" / "before_after.md").read_text()
    assert "retain accuracy % (unscreened items)" in md and "100% by construction" in md
    with open(out / "report" / "before_after.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["measure"] == "retain_accuracy_unscreened")
    assert int(row["before_n"]) == int(row["after_n"]) == len(retain_eval)
    assert "retain accuracy % (unscreened items)" in (out / "compare" / "comparison.md").read_text()


def test_relearn_reports_the_worst_case_over_learning_rates():
    import torch

    from excise.attack.relearn import RelearnConfig, relearn
    from excise.tasks.concepts import ConceptItem, encode_items
    from excise.testing import tiny_handle

    h = tiny_handle("llama")
    batches = [encode_items(h, [ConceptItem(prompt="Who made Zorb?", answer="Ann Lee")])]
    name, p0 = next((n, p.detach().clone()) for n, p in h.model.named_parameters() if p.dim() == 2)

    def check(m):  # "back" once the weights moved: only a large learning rate does that in one step
        return float((dict(m.named_parameters())[name] - p0).abs().max() > 1e-2)

    torch.manual_seed(0)
    res = relearn(h.model, batches, check, RelearnConfig(steps=2, eval_every=1, lr=1e-7, lrs=[1e-1]))
    assert res["lr"] == 1e-1 and res["steps_to_return"] == 1
    assert [(r["lr"], r["steps_to_return"]) for r in res["by_lr"]] == [(1e-7, None), (1e-1, 1)]
    one = relearn(tiny_handle("llama").model, batches, check, RelearnConfig(steps=1, lr=1e-7))
    assert one["steps_to_return"] is None and "by_lr" not in one
