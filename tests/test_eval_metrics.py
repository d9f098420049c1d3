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


def test_exact_match_of_empty_strings():
    assert m.exact_match("", ["red"]) == 0.0
    assert m.exact_match("", [""]) == 1.0


def test_vqa_soft_accuracy_is_the_leave_one_out_mean():
    # 10 human answers, m of them "red": each left-out subset scores min(1, matches / 3).
    def answers(m_red):
        return ["red"] * m_red + ["blue"] * (10 - m_red)
    assert m.vqa_accuracy("red", answers(1)) == pytest.approx((1 * 0 + 9 * 1 / 3) / 10)  # 0.3
    assert m.vqa_accuracy("red", answers(2)) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert m.vqa_accuracy("red", answers(3)) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert m.vqa_accuracy("Red.", answers(4)) == 1.0
    assert m.vqa_accuracy("green", answers(4)) == 0.0
    assert m.vqa_accuracy("", answers(4)) == 0.0
    # Two annotators who disagree: leaving "red" out leaves no match (0), leaving "blue" out one (1/3).
    assert m.vqa_accuracy("red", ["red", "blue"]) == pytest.approx((0 + 1 / 3) / 2)
    assert m.vqa_accuracy("Two.", ["2"] * 10) == 1.0  # the prediction gets the official normalisation
    assert m.vqa_accuracy("1,000", ["1000"] * 10) == 1.0  # a comma between digits is dropped


def test_vqa_single_answer_is_exact_match():
    # Deliberate difference: the official leave-one-out of one answer has nothing left and gives 0.
    assert m.vqa_accuracy("red", ["red"]) == 1.0
    assert m.vqa_accuracy("blue", ["red"]) == 0.0


@pytest.mark.parametrize("prediction, answers, expected", [
    # The scripts' rule: NL = edit distance of the stripped, lower-cased, whitespace-collapsed strings
    # / the longer raw length; the score is 1 - NL, kept when >= 0.5.
    ("helo", ["hello"], 1 - 1 / 5),
    ("hxllx", ["hello"], 1 - 2 / 5),
    ("hxxxo", ["hello"], 0.0),  # 1 - 3/5 = 0.4 < 0.5
    ("  HELLO ", ["hello"], 1.0),
    ("hello   world", ["Hello world"], 1.0),  # inner whitespace collapsed before the distance
    ("helo", ["world", "hello"], 1 - 1 / 5),  # the best answer counts
    ("hello", ["help", "hello"], 1.0),
])
def test_anls(prediction, answers, expected):
    assert m.anls(prediction, answers) == pytest.approx(expected)
    assert m.METRICS["anls"](prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, answer, expected", [
    ("13", "12", 0.5),  # 1 edit / 2: exactly 0.5 is kept, as in every published script
    ("ax", "ab", 0.5),
    ("abcd", "abxy", 0.5),  # 2 / 4
    ("abcdef", "abxyzf", 0.5),  # 3 / 6
    ("abcdefg", "abcdxyz", 1 - 3 / 7),  # 0.571
    ("abcde", "abxyz", 0.0),  # 1 - 3/5 = 0.4
    ("abc", "xyz", 0.0),
])
def test_anls_threshold_is_inclusive(prediction, answer, expected):
    assert m.anls(prediction, [answer]) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, answer, expected", [
    # The length is that of the strings as given (upper-cased), not of the normalised ones.
    ("helo  ", "hello", 1 - 1 / 6),  # distance 1 ("helo" / "hello"), length 6 with the spaces
    (" 13", "12", 1 - 1 / 3),  # distance 1, length 3
    ("ab   ", "xy", 1 - 2 / 5),  # distance 2, length 5: padding lifts a wrong answer over 0.5
    ("straße", "strase", 1 - 1 / 7),  # distance 1; "STRASSE" is 7 long
])
def test_anls_divides_by_the_raw_length(prediction, answer, expected):
    assert m.anls(prediction, [answer]) == pytest.approx(expected)


def test_anls_empty_strings():
    assert m.anls("", ["hello"]) == 0.0  # 5 edits / 5
    assert m.anls("hello", [""]) == 0.0
    assert m.anls("", [""]) == 1.0  # both empty: NL is 0
    assert m.anls("   ", [""]) == 1.0  # distance 0 between the normalised strings, length 3
    assert m.anls("hello", []) == 0.0


@pytest.mark.parametrize("prediction, answer, expected", [
    ("52", "50", 1.0),  # 2 / 50 = 4 %
    ("53", "50", 0.0),  # 6 %
    ("47.5", "50", 1.0),  # exactly 5 % below
    ("52.5", "50", 1.0),  # exactly 5 % above
    ("52.6", "50", 0.0),  # 5.2 %
    ("47.4", "50", 0.0),
    ("95", "100", 1.0), ("105", "100", 1.0), ("106", "100", 0.0),
    ("-52", "-50", 1.0),  # relative to |target|
    ("52", "-50", 0.0),
    ("5e1", "50", 1.0),  # anything Python's float reads, as in the script
    (" 52 ", "50", 1.0),
    ("fifty", "50", 0.0),  # not a number: compared as text
])
def test_chartqa_relaxed_numbers(prediction, answer, expected):
    assert m.relaxed_accuracy(prediction, [answer]) == expected
    assert m.METRICS["relaxed"](prediction, [answer]) == expected


@pytest.mark.parametrize("prediction, answer, expected", [
    ("50%", "0.5", 1.0),  # a trailing % divides by 100
    ("0.5", "50%", 1.0),
    ("50%", "50%", 1.0),
    ("52%", "50%", 1.0),  # 0.02 / 0.5 = 4 %
    ("56%", "50%", 0.0),  # 12 %
    ("50%", "50", 0.0),  # 0.5 against 50, as the script scores it
    ("50", "50%", 0.0),
])
def test_chartqa_relaxed_percentages(prediction, answer, expected):
    assert m.relaxed_accuracy(prediction, [answer]) == expected


@pytest.mark.parametrize("prediction, answer, expected", [
    # float() does not read thousands separators, so the script compares such numbers as text.
    ("1,000", "1000", 0.0),
    ("1000", "1,000", 0.0),
    ("1,000", "1,000", 1.0),
    ("1,020", "1,000", 0.0),  # within 2 %, but text
    ("1020", "1000", 1.0),  # 2 % as numbers
])
def test_chartqa_relaxed_thousands_separators(prediction, answer, expected):
    assert m.relaxed_accuracy(prediction, [answer]) == expected


@pytest.mark.parametrize("prediction, answer, expected", [
    ("Apple", "apple", 1.0),  # text: exact, case-free
    ("apples", "apple", 0.0),
    ("U.S.", "U.S.", 1.0),  # the same normalisation on both sides (this scored 0 before)
    ("u.s.", "U.S.", 1.0),
    ("Apple.", "apple", 1.0),  # deliberate: one trailing period is dropped, from both sides
    ("apple", "Apple.", 1.0),
    ("52.", "50", 1.0),  # float("52.") reads 52 in the script too
    ("50%.", "0.5", 1.0),
    ("0", "0", 1.0),
    ("0.0", "0", 0.0),  # as published: a zero target compares as text
    ("0.01", "0", 0.0),
    ("", "50", 0.0),  # empty predictions
    ("", "apple", 0.0),
    (".", "50", 0.0),
])
def test_chartqa_relaxed_text(prediction, answer, expected):
    assert m.relaxed_accuracy(prediction, [answer]) == expected


def test_chartqa_relaxed_any_answer():
    assert m.relaxed_accuracy("52", ["apple", "50"]) == 1.0
    assert m.relaxed_accuracy("52", ["apple", "60"]) == 0.0


def test_token_f1():
    assert m.token_f1("a small red circle", ["a large red circle"]) == pytest.approx(2 / 3)
    assert m.token_f1("red", ["red"]) == 1.0
    assert m.token_f1("The Red Circle!", ["red circle"]) == 1.0  # case, punctuation and articles
    assert m.token_f1("", ["red"]) == 0.0
    p, r = 2 / 2, 2 / 4  # prediction "red circle" vs "red circle blue square"
    assert m.token_f1("red circle", ["red circle blue square"]) == pytest.approx(2 * p * r / (p + r))
    # "red red" against "red": 1 common token (counts clipped); precision 1/2, recall 1.
    assert m.token_f1("red red", ["red"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert m.token_f1("blue", ["red", "blue square"]) == pytest.approx(2 * 1 * 0.5 / 1.5)  # best


def test_token_f1_squad_v2_empty_answers():
    # SQuAD v2.0: answers that normalise to nothing are dropped; with none left, only "" is right.
    assert m.token_f1("", ["the"]) == 1.0
    assert m.token_f1("red", ["the"]) == 0.0
    assert m.token_f1("", ["the", "red"]) == 0.0  # "the" is dropped, "red" remains
    assert m.token_f1("red", ["", "red"]) == 1.0
    assert m.token_f1("", []) == 1.0
    assert m.token_f1("a", ["red"]) == 0.0  # the prediction normalises to nothing


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


@pytest.mark.parametrize("prediction, label", [
    ("No", "no"), ("no, there is none", "no"), ("There is no dog.", "no"),
    ("Yes. There is no cat.", "yes"),  # only the first sentence counts
    ("NO", "yes"), ("Not really", "yes"), ("Nope", "yes"),  # POPE's exact words: No, no, not
    ("", "yes"),  # an empty answer has none of them
    ("I do not see one", "no"),
])
def test_pope_label_follows_popes_rule(prediction, label):
    assert m.pope_label(prediction) == label


def test_pope_all_yes_and_all_no():
    balanced = ["yes", "yes", "no", "no"]
    always_yes = m.pope_scores(["Yes"] * 4, balanced)  # TP 2, FP 2
    assert always_yes == pytest.approx({"accuracy": 50.0, "precision": 50.0, "recall": 100.0,
                                        "f1": 100 * 2 * 0.5 * 1 / 1.5, "yes_ratio": 100.0})
    always_no = m.pope_scores(["No"] * 4, balanced)  # TN 2, FN 2; precision 0 / 0 counts as 0
    assert always_no == {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    all_yes = m.pope_scores(["Yes", "Yes", "No"], ["yes"] * 3)  # TP 2, FN 1
    assert all_yes == pytest.approx({"accuracy": 200 / 3, "precision": 100.0, "recall": 200 / 3,
                                     "f1": 100 * 2 * 1 * (2 / 3) / (1 + 2 / 3), "yes_ratio": 200 / 3})
    all_no = m.pope_scores(["No", "No", "Yes"], ["no"] * 3)  # TN 2, FP 1; recall 0 / 0 counts as 0
    assert all_no == pytest.approx({"accuracy": 200 / 3, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                    "yes_ratio": 100 / 3})
    assert m.summarize("pope", [{"id": str(i), "prediction": "No", "answers": ["no"], "score": 1.0}
                                for i in range(3)])["score"] == 100.0


@pytest.mark.parametrize("prediction, label", [
    ("Yes", "yes"), ("NO", "no"), ("Yes.", "yes"), ("yes, it is", "yes"), ("No, there are two", "no"),
    ("Nope", "no"), ("none", "no"),  # "no" within the first four characters
    ("The answer is yes", "other"), ("I don't know", "other"), ("", "other"),
    ("  yes ", "yes"),  # stripped first (deliberate)
])
def test_mme_label_follows_mmes_rule(prediction, label):
    assert m.mme_label(prediction) == label


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
