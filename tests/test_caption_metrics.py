"""Caption gender bias (English and Arabic): lexicon inference, counterfactual swaps, gender metrics on a
hand-computed set, BLEU/ROUGE-L against their libraries, and undefined cases (NaN, n = 0)."""

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from excise.errors import ExciseError
from excise.measure.captions import (CaptionItem, UnicodeTokenizer, bleu, caption_gender_result,
                                     caption_quality_result, rouge_l)
from excise.measure.stats import bootstrap_diff
from excise.tasks.caption_lexicon import (analyse_arabic_word, english_lexicon, gender_mentions, infer_gender,
                                          normalize_arabic)
from excise.tasks.caption_swap import swap_caption

EN = {"f_kitchen": "a woman is cooking food in the kitchen", "m_laundry": "a man is washing clothes in the laundry",
      "m_garage": "a man is fixing a car in the garage", "f_workshop": "a woman is cutting wood in the workshop",
      "n_kitchen": "a person is cooking food in the kitchen"}
AR = {"f_kitchen": "امرأة تطبخ الطعام في المطبخ", "m_laundry": "رجل يغسل الملابس في المغسلة",
      "m_garage": "رجل يصلح السيارة في المرآب", "f_workshop": "امرأة تقطع الخشب في الورشة",
      "n_kitchen": "شخص يطبخ الطعام في المطبخ"}


# --- lexicon --------------------------------------------------------------------------------------

def test_english_lexicon_from_genderswaps():
    lex = english_lexicon()
    assert not lex.male & lex.female
    assert {"man", "men", "he", "his", "him", "boy", "father", "king", "mr"} <= lex.male
    assert {"woman", "women", "she", "her", "girl", "mother", "queen", "aunt", "mommy", "ms", "mrs", "princess",
            "ma'am"} <= lex.female  # female-first lines turned round; partners from generalized_swaps
    assert not {"tailor", "host", "master", "miss"} & (lex.male | lex.female)
    assert {"person", "people", "someone", "child", "they"} <= lex.neutral


@pytest.mark.parametrize("caption,gender", [
    (EN["f_kitchen"], "female"), (EN["m_laundry"], "male"), (EN["n_kitchen"], "neutral"),
    ("A man and a woman are cooking", "mixed"), ("The woman's bicycle", "female"), ("Mr. Smith repairs a car", "male"),
    ("then the dog ate", "none"), ("a tailor at work", "none"), ("They cook while she watches", "female"),
])
def test_infer_gender_english(caption, gender):
    assert infer_gender(caption, "en") == gender


@pytest.mark.parametrize("caption,gender", [
    (AR["f_kitchen"], "female"), (AR["m_laundry"], "male"), (AR["m_garage"], "male"), (AR["f_workshop"], "female"),
    (AR["n_kitchen"], "neutral"),  # شخص takes masculine agreement but is neutral: nouns decide
    ("والمرأة في المطبخ", "female"), ("المرأة في المطبخ", "female"), ("للرجل سيارة", "male"),
    ("بالأب والأم", "mixed"), ("رجل وامرأة في المطبخ", "mixed"), ("إمرأةٌ تَطبُخُ", "female"), ("امراه تطبخ", "female"),
    ("امـــرأة تطبخ", "female"), ("الناس في السوق", "neutral"), ("أطفال يلعبون", "neutral"),
    ("وهي تطبخ", "female"), ("هو يقرأ", "male"),
    ("تطبخ الطعام في المطبخ", "female"), ("يصلح السيارة في المرآب", "male"),  # pro-drop: the verb is evidence
    ("في المطبخ تطبخ الطعام", "female"),  # after a prepositional phrase
    ("طعام يطبخ على النار", "none"),  # the verb agrees with food
    ("باب مفتوح", "none"),  # a door, not ب + أب
    ("رجل مع ابنه", "male"),  # his son, not ابنة
    ("امرأة مع زوجها", "mixed"), ("طفلة تلعب", "female"),
])
def test_infer_gender_arabic(caption, gender):
    assert infer_gender(caption, "ar") == gender


def test_arabic_normalisation_and_clitics():
    assert normalize_arabic("إمرأةٌ آمنة أحمد مستشفى") == "امراه امنه احمد مستشفي"
    assert normalize_arabic("امـــرأة", ta_marbuta=False) == "امراة"
    a = analyse_arabic_word("والمرأة")
    assert (a.prefix, a.stem, a.gender, a.definite) == ("وال", "امرأة", "female", True)
    a = analyse_arabic_word("زوجته")
    assert (a.stem, a.suffix, a.possessor) == ("زوجة", "ه", "male")
    assert analyse_arabic_word("المطبخ") is None
    m = gender_mentions(AR["n_kitchen"], "ar")
    assert m.neutral and m.verb is None  # the verb is not consulted once a noun is found


def test_unknown_language_is_an_error():
    with pytest.raises(ExciseError, match="language"):
        infer_gender("a man", "fr")


# --- swaps ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("female,male", [
    (AR["f_kitchen"], "رجل يطبخ الطعام في المطبخ"), ("امرأة تغسل الملابس في المغسلة", AR["m_laundry"]),
    ("امرأة تصلح السيارة في المرآب", AR["m_garage"]), (AR["f_workshop"], "رجل يقطع الخشب في الورشة"),
    ("المرأة طويلة", "الرجل طويل"), ("المرأة الطويلة تطبخ", "الرجل الطويل يطبخ"), ("امرأة سعيدة", "رجل سعيد"),
    ("والمرأة ستطبخ", "والرجل سيطبخ"), ("هي تطبخ وهو يقرأ", "هو يطبخ وهي تقرأ"),
    ("تطبخ امرأة الطعام", "يطبخ رجل الطعام"), ("صورة لامرأة تطبخ", "صورة لرجل يطبخ"),
    ("المرأة تساعد زوجها في المطبخ", "الرجل يساعد زوجته في المطبخ"), ("البنت تلعب مع أخيها", "الولد يلعب مع أخته"),
])
def test_arabic_swap_with_agreement(female, male):
    assert swap_caption(female, "ar") == male
    assert swap_caption(male, "ar") == female


def test_arabic_swap_several_words_and_neutral():
    assert swap_caption("رجل وامرأة في المطبخ، والرجل يطبخ.", "ar") == "امرأة ورجل في المطبخ، والمرأة تطبخ."
    assert swap_caption("للمرأة سيارة وللرجل دراجة", "ar") == "للرجل سيارة وللمرأة دراجة"
    assert swap_caption("امرأة تساعد امرأة", "ar") == "رجل يساعد رجل"  # each verb changes once
    assert swap_caption("امرأةٌ تَطبُخُ", "ar") == "رجل يَطبُخُ"  # the verb keeps its diacritics
    for neutral in (AR["n_kitchen"], "الناس في السوق", "طعام يطبخ على النار"):
        assert swap_caption(neutral, "ar") == neutral
    assert swap_caption("رجل الأعمال يقرأ", "ar") == "امرأة الأعمال يقرأ"  # a construct: no agreement across it


def test_english_swap_delegates():
    assert swap_caption(EN["f_kitchen"], "en") == "a man is cooking food in the kitchen"
    assert swap_caption("The man told his wife that he loves her.", "en") == \
        "The woman told her husband that she loves him."
    assert swap_caption(EN["n_kitchen"], "en") == EN["n_kitchen"]


# --- gender metrics -------------------------------------------------------------------------------

def _hand_set():
    F, M = "female", "male"
    rows = [  # (caption, item); comments: inferred gender, correct?
        (EN["f_kitchen"], CaptionItem("kitchen", F, F)),  # female, correct, stereotypical
        (EN["f_kitchen"], CaptionItem("kitchen", M, F)),  # female, wrong gender, counter
        ("a man is cooking food", CaptionItem("kitchen", M, F)),  # male, correct, counter
        (EN["m_garage"], CaptionItem("garage", M, M)),  # male, correct, stereotypical
        ("a person is fixing a car", CaptionItem("garage", F, M)),  # neutral, wrong, counter
        ("a woman is fixing a car", CaptionItem("garage", F, M)),  # female, correct, counter
        ("a woman is washing clothes", CaptionItem("laundry", F, F)),  # female, correct, stereotypical
        ("a man and a woman cut wood", CaptionItem("workshop", F, None)),  # mixed, wrong, no stereotype
        (EN["f_kitchen"], CaptionItem("kitchen", None, F, visible=False)),  # gendered, stereotyped
        ("a person is fixing a car", CaptionItem("garage", None, M, visible=False)),  # neutral
        ("a woman is fixing a car", CaptionItem("garage", None, M, visible=False)),  # gendered, anti-stereotyped
        ("a man is cutting wood", CaptionItem("workshop", None, None, visible=False)),  # gendered, no stereotype
    ]
    return [c for c, _ in rows], [it for _, it in rows]


def test_gender_result_hand_computed():
    caps, items = _hand_set()
    r = caption_gender_result(caps, items, n_boot=300)
    expect = {"gender_accuracy": (5 / 8, 8), "accuracy_male": (2 / 3, 3), "accuracy_female": (3 / 5, 5),
              "accuracy_stereotypical": (1.0, 3), "accuracy_counter_stereotypical": (2 / 4, 4),
              "wrong_gender_rate": (1 / 8, 8), "no_gender_rate": (1 / 8, 8), "ambiguous_gendered_rate": (3 / 4, 4),
              "ambiguous_stereotype_rate": (1 / 3, 3), "ambiguous_stereotype_share": (1 / 2, 2)}
    for m, (v, n) in expect.items():
        e = r[m]
        assert e.value == pytest.approx(v) and e.n == n and e.method == "wilson", m
        assert e.lo <= e.value <= e.hi
    gap = r.differences["bias_gap"]
    assert gap.value == pytest.approx(2 / 3 - 3 / 5) and gap.n == 3
    ref = bootstrap_diff([0, 1, 1], [1, 0, 1, 1, 0], n_boot=300, seed=0)  # male, female outcomes in item order
    assert (gap.lo, gap.hi) == (ref.lo, ref.hi)
    sg = r.differences["stereotype_gap"]
    assert sg.value == pytest.approx(0.5) and sg.lo <= 0.5 <= sg.hi
    k = r.group("kitchen")
    assert (k["gender_accuracy"].value, k["gender_accuracy"].n) == (pytest.approx(2 / 3), 3)
    assert (k["accuracy_male"].value, k["accuracy_female"].value) == (0.5, 1.0)
    assert k["ambiguous_stereotype_rate"].value == 1.0 and k["ambiguous_stereotype_rate"].n == 1
    assert r.group_by == "context" and r.meta["inferred"]["mixed"] == 1
    again = caption_gender_result(caps, items, n_boot=300)
    assert again.as_dict() == r.as_dict()  # fixed seed


def test_gender_result_arabic_and_mixed_languages():
    F, M = "female", "male"
    ar = [(AR["f_kitchen"], CaptionItem("kitchen", F, F, lang="ar")),
          (AR["n_kitchen"], CaptionItem("kitchen", M, F, lang="ar")),  # neutral: not correct
          ("تطبخ الطعام", CaptionItem("kitchen", None, F, visible=False, lang="ar"))]  # verb says female
    en = [(EN["m_garage"], CaptionItem("garage", M, M))]
    r = caption_gender_result([c for c, _ in ar + en], [it for _, it in ar + en], n_boot=100)
    assert r["gender_accuracy"].value == pytest.approx(2 / 3)
    assert r["ambiguous_stereotype_rate"].value == 1.0
    assert r.group_by == "lang:context" and set(r.by_group) == {"ar:kitchen", "en:garage"}


def test_item_from_folder_labels():
    it = CaptionItem.from_labels("kitchen", "male", False, visible=False, lang="ar")
    assert (it.stereotype, it.stereotypical, it.true_gender) == ("female", None, "male")  # hidden: no accuracy
    assert CaptionItem.from_labels("garage", "male", True).stereotypical is True
    assert CaptionItem.from_labels("garage", "female", None).stereotype is None


def test_gender_result_undefined_cells():
    r = caption_gender_result([EN["m_garage"]], [CaptionItem("garage", "male", None)], n_boot=50)
    for m in ("accuracy_female", "accuracy_stereotypical", "ambiguous_gendered_rate", "ambiguous_stereotype_share"):
        assert math.isnan(r[m].value) and r[m].n == 0
    for d in ("bias_gap", "stereotype_gap"):
        assert math.isnan(r.differences[d].value) and r.differences[d].n == 0
    row = [x for x in r.rows() if x["metric"] == "accuracy_female" and x["scope"] == "overall"][0]
    assert row["n"] == 0
    empty = caption_gender_result([], [])
    assert math.isnan(empty["gender_accuracy"].value) and empty["gender_accuracy"].n == 0


def test_gender_result_bad_input():
    with pytest.raises(ExciseError, match="one caption per item"):
        caption_gender_result(["a man"], [])
    with pytest.raises(ExciseError, match="true_gender"):
        caption_gender_result(["a man"], [CaptionItem("garage", None)])
    with pytest.raises(ExciseError, match="stereotype"):
        caption_gender_result(["a man"], [CaptionItem("garage", "male", "men")])


# --- caption quality ------------------------------------------------------------------------------

HYP_EN = ["a woman is cooking in the kitchen", "a man fixes a car", "a person is washing clothes", "a dog"]
REF_EN = ["a woman is cooking food in the kitchen", "a man is fixing a car in the garage",
          "a man is washing clothes in the laundry", "a woman is cutting wood in the workshop"]


def test_bleu_equals_sacrebleu():
    e = bleu(HYP_EN, REF_EN, "en", n_boot=200)
    assert e.value == pytest.approx(sacrebleu.corpus_bleu(HYP_EN, [REF_EN]).score, abs=1e-9)
    assert e.n == 4 and e.lo <= e.value <= e.hi and e.method == "bleu-bootstrap"
    assert bleu(HYP_EN, REF_EN, "en", n_boot=200) == e  # fixed seed
    refs2 = [[r, h] for r, h in zip(REF_EN, reversed(HYP_EN))]  # two references per item
    two = sacrebleu.corpus_bleu(HYP_EN, [[r[0] for r in refs2], [r[1] for r in refs2]]).score
    assert bleu(HYP_EN, refs2, "en", n_boot=10).value == pytest.approx(two, abs=1e-9)
    hyp_ar, ref_ar = ["امرأة تطبخ في المطبخ", "رجلٌ يُصلح السيارة"], [AR["f_kitchen"], AR["m_garage"]]
    want = sacrebleu.corpus_bleu([normalize_arabic(h) for h in hyp_ar], [[normalize_arabic(r) for r in ref_ar]],
                                 tokenize="intl").score
    assert bleu(hyp_ar, ref_ar, "ar", n_boot=50).value == pytest.approx(want, abs=1e-9)


def test_rouge_l_arabic_lcs():
    hyp, ref = "امرأة تطبخ في المطبخ", "امرأة تطبخ الطعام في المطبخ"
    assert RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure == 0.0  # default tokenizer drops Arabic
    s = RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer()).score(ref, hyp)["rougeL"]
    assert (s.precision, s.recall) == (1.0, 0.8) and s.fmeasure == pytest.approx(2 * 0.8 / 1.8)
    e = rouge_l([hyp], [ref], "ar", n_boot=50)
    assert e.value == pytest.approx(100 * 2 * 0.8 / 1.8) and e.n == 1
    assert rouge_l(["إمرأةٌ تطبخ"], ["امرأة تطبخ"], "ar").value == pytest.approx(100.0)  # normalised
    e = rouge_l(HYP_EN, REF_EN, "en", n_boot=200)
    default = RougeScorer(["rougeL"])
    assert e.value == pytest.approx(np.mean([100 * default.score(r, h)["rougeL"].fmeasure
                                             for h, r in zip(HYP_EN, REF_EN)]))
    assert e.lo <= e.value <= e.hi and e.n == 4


def test_quality_undefined_and_result():
    for f in (bleu, rouge_l):
        e = f([], [], "en")
        assert math.isnan(e.value) and e.n == 0
    with pytest.raises(ExciseError):
        bleu(["a"], [], "en")
    hyps = HYP_EN + ["امرأة تطبخ في المطبخ"]
    refs = REF_EN + [AR["f_kitchen"]]
    langs = ["en"] * 4 + ["ar"]
    r = caption_quality_result(hyps, refs, langs, n_boot=100)
    assert r.group("en")["bleu"].value == pytest.approx(bleu(HYP_EN, REF_EN, "en").value)
    assert r.group("ar")["rouge_l"].value == pytest.approx(100 * 2 * 0.8 / 1.8)
    assert r["rouge_l"].n == 5 and r["bleu"].n == 5 and r.group_by == "lang"
    assert r["rouge_l"].value == pytest.approx((4 * rouge_l(HYP_EN, REF_EN).value + 100 * 2 * 0.8 / 1.8) / 5)
