"""Every metric against values worked out by hand from its published definition."""

from __future__ import annotations

import pytest

from tinyomni.eval import metrics as m


@pytest.mark.parametrize("prediction, answers, expected", [
    ("Red.", ["red"], 1.0),
    ("two", ["2"], 1.0),  # number words become digits
    ("the cat", ["cat"], 1.0),  # articles dropped
    ("dont", ["don't"], 1.0),  # contractions restored
    ("1,000", ["1000"], 1.0),  # thousands commas dropped
    ("red circle", ["red"], 0.0),
    ("blue", ["red", "Blue"], 1.0),
])
def test_normalised_exact_match(prediction, answers, expected):
    assert m.exact_match(prediction, answers) == expected


@pytest.mark.parametrize("prediction, answers, expected", [
    ("The capital of France is Paris.", ["Paris"], 1.0),
    ("Parisian food is good.", ["Paris"], 0.0),  # whole words only
    ("A week has seven days.", ["7"], 1.0),  # normalised on both sides
    ("Romeo and Juliet was written by William Shakespeare.", ["Shakespeare", "William Shakespeare"], 1.0),
    ("I do not know.", ["Paris"], 0.0),
])
def test_contains_finds_the_answer_as_whole_words(prediction, answers, expected):
    assert m.contains(prediction, answers) == expected
    assert m.METRICS["contains"](prediction, answers) == expected


def test_evalai_normalisation_details():
    assert m.normalize_answer("Yes, it is!") == "yes it is"
    assert m.normalize_answer("x-ray") == "x ray"  # no "- " or " -": the hyphen becomes a space
    assert m.normalize_answer("3.5 kg") == "3.5 kg"  # a decimal point survives
    assert m.normalize_answer("An apple.") == "apple"


def test_vqa_soft_accuracy_is_the_leave_one_out_mean():
    # 10 human answers, m of them "red": each left-out subset scores min(1, matches / 3).
    def answers(m_red):
        return ["red"] * m_red + ["blue"] * (10 - m_red)
    assert m.vqa_accuracy("red", answers(1)) == pytest.approx((1 * 0 + 9 * 1 / 3) / 10)  # 0.3
    assert m.vqa_accuracy("red", answers(2)) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert m.vqa_accuracy("red", answers(3)) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert m.vqa_accuracy("Red.", answers(4)) == 1.0
    assert m.vqa_accuracy("green", answers(4)) == 0.0
    assert m.vqa_accuracy("red", ["red"]) == 1.0  # a single reference: exact match


def test_anls():
    assert m.anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5
    assert m.anls("hxllx", ["hello"]) == pytest.approx(0.6)  # 2 / 5
    assert m.anls("hxxxo", ["hello"]) == 0.0  # 3 / 5 = 0.6 >= 0.5
    assert m.anls("ax", ["ab"]) == 0.0  # exactly 0.5 is cut
    assert m.anls("  HELLO ", ["hello"]) == 1.0
    assert m.anls("helo", ["world", "hello"]) == pytest.approx(0.8)  # best answer
    assert m.levenshtein("kitten", "sitting") == 3


def test_chartqa_relaxed_accuracy():
    assert m.relaxed_accuracy("52", ["50"]) == 1.0  # 4 %
    assert m.relaxed_accuracy("53", ["50"]) == 0.0  # 6 %
    assert m.relaxed_accuracy("47.5", ["50"]) == 1.0  # exactly 5 %
    assert m.relaxed_accuracy("50%", ["0.5"]) == 1.0  # percentages become fractions
    assert m.relaxed_accuracy("Apple", ["apple"]) == 1.0  # text: exact, case-free
    assert m.relaxed_accuracy("0", ["0"]) == 1.0
    assert m.relaxed_accuracy("0.0", ["0"]) == 0.0  # as published: a zero target compares as text


def test_token_f1():
    assert m.token_f1("a small red circle", ["a large red circle"]) == pytest.approx(2 / 3)
    assert m.token_f1("red", ["red"]) == 1.0
    assert m.token_f1("", ["red"]) == 0.0
    p, r = 2 / 2, 2 / 4  # prediction "red circle" vs "red circle blue square"
    assert m.token_f1("red circle", ["red circle blue square"]) == pytest.approx(2 * p * r / (p + r))


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B. right", "B"), ("C) above", "C"), ("The answer is C", "C"),
    ("Answer: D", "D"), ("it is to the right", "B"), ("A small circle", None), ("left or right", None),
    ("E", None),
])
def test_multiple_choice_letter_extraction(text, letter):
    assert m.extract_choice(text, ["left", "right", "above", "below"]) == letter


def test_circular_multiple_choice_needs_every_rotation():
    from tinyomni.eval.tasks import Item, circular_variants

    item = Item("q", "Where?", ["B"], "multiple_choice", choices=["left", "right", "above", "below"])
    variants = circular_variants(item)
    assert [v.choices["ABCD".index(v.answers[0])] for v in variants] == ["right"] * 4
    assert [v.answers[0] for v in variants] == ["B", "A", "D", "C"]

    def rows(predict):
        out = []
        for v in variants:
            p = predict(v)
            out.append({"id": v.id, "circular_of": v.circular_of, "prediction": p, "answers": v.answers,
                        "score": m.multiple_choice(p, v.answers, v.choices), "n_options": 4})
        return out
    right = m.summarize("multiple_choice", rows(lambda v: v.answers[0]))
    always_a = m.summarize("multiple_choice", rows(lambda v: "A"))
    by_text = m.summarize("multiple_choice", rows(lambda v: "right"))
    assert right["score"] == 100.0 and by_text["score"] == 100.0
    assert always_a["score"] == 0.0 and always_a["single_pass"] == 0.0  # rotation 0's answer is B
    assert always_a["chance"] == pytest.approx(100 * 0.25 ** 4)


def test_pope_scores():
    predictions = ["Yes, there is.", "No.", "yes", "There is not a cat.", "I think so"]
    labels = ["yes", "no", "no", "yes", "yes"]
    assert [m.pope_label(p) for p in predictions] == ["yes", "no", "yes", "no", "yes"]
    s = m.pope_scores(predictions, labels)  # TP 2, FP 1, TN 1, FN 1
    assert s["accuracy"] == pytest.approx(60.0)
    assert s["precision"] == pytest.approx(200 / 3)
    assert s["recall"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(200 / 3)
    assert s["yes_ratio"] == pytest.approx(60.0)


def test_mme_acc_acc_plus_and_sums():
    def row(cat, image, prediction, answer):
        return {"id": f"{image}-{prediction}", "category": cat, "group": image, "prediction": prediction,
                "answers": [answer]}
    rows = [
        row("existence", "im1", "Yes", "yes"), row("existence", "im1", "no", "no"),
        row("existence", "im2", "yes", "yes"), row("existence", "im2", "yes", "no"),
        row("count", "im3", "No, there are two", "yes"), row("count", "im3", "other stuff", "no"),
        row("code_reasoning", "im4", "yes", "yes"), row("code_reasoning", "im4", "no", "no"),
    ]
    assert m.mme_label("No, there are two") == "no" and m.mme_label("other stuff") == "other"
    s = m.mme_scores(rows)
    assert s["categories"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4}
    assert s["categories"]["count"]["score"] == 0.0
    assert s["perception"] == 125.0 and s["cognition"] == 200.0 and s["total"] == 325.0
    assert m.summarize("mme", rows)["score"] == pytest.approx((125 + 0 + 200) / 6)


def test_wer_and_cer():
    assert m.word_errors("the cat sat on mat", "the cat sat on the mat") == (1, 6)  # one deletion
    assert m.word_errors("hello there world", "hello world") == (1, 2)  # one insertion
    assert m.wer(["the cat sat on mat", "hello there world"],
                 ["the cat sat on the mat", "hello world"]) == pytest.approx(2 / 8)
    assert m.wer(["Hello, World!"], ["hello world"]) == 0.0
    assert m.cer(["abd"], ["abc"]) == pytest.approx(1 / 3)
    rows = [{"id": "a", "prediction": "the cat sat on mat", "answers": ["the cat sat on the mat"],
             "score": 0},
            {"id": "b", "prediction": "hello there world", "answers": ["hello world"], "score": 0}]
    s = m.summarize("wer", rows)
    assert s["wer"] == pytest.approx(25.0) and s["score"] == pytest.approx(75.0)


def test_chance_levels():
    rows = [{"id": str(i), "score": 0.0, "n_options": k} for i, k in enumerate([2, 4, 0, 8])]
    assert m.chance_level("exact_match", rows) == pytest.approx(100 * (1 / 2 + 1 / 4 + 0 + 1 / 8) / 4)
    assert m.chance_level("exact_match", [{"id": "x", "n_options": 0}]) is None
    assert m.chance_level("pope", [{"id": "x"}]) == 50.0
