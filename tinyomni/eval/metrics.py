"""Metrics, each written from the script the field reports with and tested on hand-computed cases.

Per item, `METRICS[name](prediction, answers, choices)` gives a score in [0, 1]. Metrics that are
defined over a whole set (POPE's precision/recall, MME's acc+, corpus WER, circular multiple choice)
are computed by `summarize(metric, rows)` from the per-item prediction rows the runner writes.

Each metric's docstring names the reference script it follows and every place where it deliberately
differs; docs/world_and_eval.md has the same as a table. In short:

- exact_match: the official VQA normalisation (vqaEval.py) on both sides, then equality with any answer.
- contains: the same normalisation, then any answer occurring as whole words inside the prediction
  (for chat models that answer "The capital of France is Paris." to "Paris"); tinyomni's own and
  lenient, so use it for open questions with one short answer, never for yes/no or numbers.
- vqa: VQA soft accuracy of the official vqaEval.py (mean over leave-one-out subsets of the human
  answers of min(1, #matches / 3)); one answer falls back to exact_match.
- anls: the DocVQA / InfoVQA / ST-VQA ANLS script (and lmms-eval's copy): threshold 0.5 inclusive.
- relaxed: ChartQA relaxed accuracy (pix2struct / Qwen-VL / lmms-eval `relaxed_correctness`).
- f1: the SQuAD v2.0 evaluate script's token F1.
- multiple_choice: the option letter extracted from the answer; MMBench circular evaluation counts a
  question only if every rotation of its options is answered correctly.
- pope: POPE's evaluate.py (yes/no from the first sentence); accuracy, precision, recall, F1, yes-ratio.
- mme: MME's eval_tool/calculation.py; per-category acc and acc+ (both questions of an image right),
  category score = acc + acc+, perception and cognition sums.
- wer / cer: word / character error rate, summed over the corpus (edits / reference length).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

# --- EvalAI answer normalisation (VQA), from the official vqaEval.py ----------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The official pattern, including its odd "(?!<=\d)" (a lookahead, not a lookbehind): kept as published.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
         "?", "!")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The official VQA normalisation (vqaEval.py's processPunctuation then processDigitArticle):
    punctuation, number words to digits, lower case, articles dropped, contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the prediction equals any answer after `normalize_answer` on both sides, else 0.

    Follows the normalisation of the official VQA vqaEval.py (as lmms-eval's exact-match VQA tasks
    do), applied to the gold answers too: tinyomni's task files hold answers as people write them,
    not pre-normalised like VQAv2's annotations.
    """
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def contains(prediction: str, answers: Sequence[str]) -> float:
    """1 if any normalised answer occurs as whole words inside the normalised prediction.

    No published script: tinyomni's own lenient score for chat models that answer in a sentence.
    """
    p = f" {normalize_answer(prediction)} "
    return float(any(a and f" {a} " in p for a in (normalize_answer(x) for x in answers)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy, as the official VQA vqaEval.py computes it.

    For each human answer left out in turn, min(1, matches among the other answers / 3); the score is
    the mean over the left-out answers (so with 10 answers, 3 matches give 0.9, 4 or more give 1).
    Deliberate differences from vqaEval.py:
    - a single gold answer scores as exact_match: the official leave-one-out leaves nothing to match
      against and would score every prediction 0;
    - gold answers always get the full normalisation (`normalize_answer`); vqaEval.py only strips
      their punctuation, and only when the annotators disagree (lmms-eval's vqav2 also maps digits
      and articles then). On VQAv2's annotations, already normalised, the two agree.
    """
    p = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(p == gts[0])
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == p)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores) if scores else 0.0


# --- edit distances --------------------------------------------------------------------------------

def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one item, as the DocVQA / InfoVQA / ST-VQA
    evaluation scripts (Robust Reading Competition) and lmms-eval's `anls` compute it.

    For each answer, NL = edit distance / length, where the distance is between the stripped,
    lower-cased, whitespace-collapsed strings and the length is the longer of the two strings as
    given (`len(s.upper())`, neither stripped nor collapsed, exactly as the scripts measure it). The
    score is 1 - the smallest NL, or 0 when that is below `threshold`: a similarity of exactly 0.5
    counts ("13" against "12" scores 0.5). Two empty strings score 1. Followed to the letter so that
    DocVQA, InfoVQA and OCR scores compare with papers: no deliberate differences, except that an
    item without answers scores 0 (the scripts fail on one).
    """
    p = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        # The scripts take the length of the raw strings, upper-cased (an "ß" counts as two).
        length = max(len(answer.upper()), len(prediction.upper()))
        nl = levenshtein(_anls_text(answer), p) / length if length else 0.0
        best = max(best, 1.0 - nl)
    return best if best >= threshold else 0.0


# --- charts ----------------------------------------------------------------------------------------

def _relaxed_text(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1 if the prediction matches any answer, else 0.

    Follows ChartQA's `relaxed_correctness` as pix2struct, Qwen-VL and lmms-eval run it: when both
    sides parse as numbers (Python `float`; a trailing "%" divides by 100) and the answer is not 0,
    a relative error |p - t| / |t| of at most 5 % counts (exactly 5 % included, in floating point as
    there); otherwise the two strings must be equal ignoring case. As in the script, "50%" against
    "0.5" is right and against "50" wrong; "1,000" is text, so it matches only "1,000"; a gold 0
    compares as text ("0.0" is wrong). Deliberate difference: both sides are first stripped of
    surrounding whitespace and of one trailing period, the same way, so "Apple." against "apple"
    and "U.S." against "U.S." are right (the script scores the first 0; chat models end their
    answers with a period).
    """
    p = _relaxed_text(prediction)
    return float(any(_relaxed_one(_relaxed_text(a), p, tolerance) for a in answers))


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_one(target: str, prediction: str, tolerance: float) -> bool:
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:  # as published: a target of 0 falls through to string equality
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


# --- extractive QA ---------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def _squad_normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _squad_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if not same:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token F1, best over the answers, as the SQuAD v2.0 evaluate script computes it.

    Both sides are lower-cased, stripped of punctuation and of the articles a/an/the, and split on
    whitespace. Answers that normalise to nothing are dropped; if none is left the only right
    prediction is an empty one (v2.0's unanswerable questions), and an empty prediction or answer
    scores 1 only against an empty other side. No deliberate differences.
    """
    p = _squad_normalize(prediction).split()
    golds = [g for g in (_squad_normalize(a).split() for a in answers) if g] or [[]]
    return max(_squad_f1(p, g) for g in golds)


# --- multiple choice -------------------------------------------------------------------------------

def extract_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a free-form answer picks, or None (then it counts as wrong).

    In order: the whole answer is a letter ("B", "(B)", "B."); it starts with a marked letter ("B. left",
    "(B) left", "B: left"); it says "answer is B" / "Answer: B" / "option B"; exactly one option's
    text occurs in it. "A small circle" is not read as option A: a letter must be marked.
    Deliberate difference from MMBench's evaluator (VLMEvalKit): that one matches letters with its
    own heuristics and asks an LLM judge when they fail; tinyomni uses these rules only, no judge.
    """
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]
    text = prediction.strip()
    bare = text.strip("()[]. :")
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    m = re.match(r"^\(?([A-Z])(?:[.):]|\)\s)", text)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.search(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*|:\s*)?\(?([A-Z])\b", text)
    if m and m.group(1) in letters:
        return m.group(1)
    low = f" {_squad_normalize(text)} "
    options = [f" {_squad_normalize(c)} " for c in choices]
    hits = [letters[i] for i, option in enumerate(options) if option.strip() and option in low]
    return hits[0] if len(hits) == 1 else None


def multiple_choice(prediction: str, answers: Sequence[str], choices: Sequence[str] | None) -> float:
    """1 if the letter `extract_choice` reads is the answer letter; without choices, exact_match.
    MMBench's circular score (every rotation right) is computed over rows by `summarize`."""
    if not choices:
        return exact_match(prediction, answers)
    return float(extract_choice(prediction, choices) in answers)


# --- yes/no benchmarks -----------------------------------------------------------------------------

def pope_label(prediction: str) -> str:
    """POPE's evaluate.py rule: keep the text before the first ".", drop commas, split on spaces;
    "no" if a word is exactly "No", "no" or "not", else "yes". Followed as published, quirks included:
    "NO", "Not really" and "Nope" read as yes, and so does an empty answer. (lmms-eval's pope instead
    needs the whole answer to be "yes" or "no" after lower-casing, so its numbers differ on answers
    that are sentences.)"""
    text = prediction
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes = positive) and the share of yes answers, in %, as POPE's
    evaluate.py computes them (any label but "no" is positive, as there). Deliberate difference: a
    ratio with nothing to count (precision when nothing is answered yes, recall when no label is
    yes, F1 when both are 0) is 0, as in lmms-eval, where POPE's script stops with a division by
    zero. lmms-eval's yes-ratio counts the labels, not the answers; this one counts the answers, as
    POPE's script does."""
    pred = [pope_label(p) == "yes" for p in predictions]
    gold = [str(label).strip().lower() != "no" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    n = max(len(pred), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * (tp + tn) / n, "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * sum(pred) / n}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(prediction: str) -> str:
    """MME's eval_tool/calculation.py rule, on the lower-cased answer: "yes"/"no" exactly, else "yes"
    if "yes" occurs in its first four characters, else "no" if "no" does ("Nope", "none"), else
    "other" (always wrong). Deliberate difference: surrounding whitespace is stripped first, so
    "   yes" is yes (the script reads its first four characters, "   y", as other)."""
    p = prediction.strip().lower()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """MME's scores, as eval_tool/calculation.py computes them, from rows {category, group (the
    image), prediction, answers}. In MME's units: acc (questions right) and acc+ (images with both
    questions right) in %, category score = acc + acc+ (max 200), perception the sum over its ten
    categories (max 2000), cognition over its four (max 800). No deliberate differences."""
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_category[row.get("category") or "default"].append(row)
    categories = {}
    for category, items in sorted(by_category.items()):
        right = [mme_label(r["prediction"]) == r["answers"][0].strip().lower() for r in items]
        images: dict[str, list[bool]] = defaultdict(list)
        for r, ok in zip(items, right):
            images[str(r.get("group") or r["id"])].append(ok)
        acc = 100 * sum(right) / len(right)
        acc_plus = 100 * sum(all(v) for v in images.values()) / len(images)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(items)}
    perception = sum(v["score"] for k, v in categories.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in categories.items() if k in MME_COGNITION)
    return {"categories": categories, "perception": perception, "cognition": cognition,
            "total": perception + cognition}


# --- transcription ---------------------------------------------------------------------------------

def normalize_transcript(text: str) -> str:
    """Lower case, hyphens as spaces, punctuation (but apostrophes) removed, single spaces."""
    text = text.lower().replace("-", " ")
    text = "".join(ch for ch in text if ch == "'" or ch not in string.punctuation)
    return " ".join(text.split())


def word_errors(prediction: str, reference: str) -> tuple[int, int]:
    """(edits, reference words) after normalisation."""
    ref = normalize_transcript(reference).split()
    return levenshtein(ref, normalize_transcript(prediction).split()), len(ref)


def char_errors(prediction: str, reference: str) -> tuple[int, int]:
    """(edits, reference characters) after normalisation."""
    ref = normalize_transcript(reference)
    return levenshtein(ref, normalize_transcript(prediction)), len(ref)


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate: total word edits / total reference words (can exceed 1), as jiwer and
    the Whisper / LibriSpeech evaluations compute it. Deliberate difference: `normalize_transcript`
    is tinyomni's own, simpler than Whisper's EnglishTextNormalizer (no number or spelling
    normalisation), so WERs of models whose numbers or spellings vary read higher than in papers."""
    counts = [word_errors(p, r) for p, r in zip(predictions, references)]
    return sum(e for e, _ in counts) / max(sum(n for _, n in counts), 1)


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus character error rate: total character edits / total reference characters (spaces
    included), after the same normalisation as `wer`."""
    counts = [char_errors(p, r) for p, r in zip(predictions, references)]
    return sum(e for e, _ in counts) / max(sum(n for _, n in counts), 1)


def _item_error_score(errors: Callable[[str, str], tuple[int, int]]) -> Callable[..., float]:
    def score(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
        edits, length = errors(prediction, answers[0])
        return max(0.0, 1.0 - edits / max(length, 1))
    return score


# Per-item scores, all in [0, 1]: (prediction, answers, choices) -> score.
METRICS: dict[str, Callable[..., float]] = {
    "exact_match": lambda p, a, c=None: exact_match(p, a),
    "contains": lambda p, a, c=None: contains(p, a),
    "vqa": lambda p, a, c=None: vqa_accuracy(p, a),
    "anls": lambda p, a, c=None: anls(p, a),
    "relaxed": lambda p, a, c=None: relaxed_accuracy(p, a),
    "f1": lambda p, a, c=None: token_f1(p, a),
    "multiple_choice": multiple_choice,
    "pope": lambda p, a, c=None: float(pope_label(p) == a[0].strip().lower()),
    "mme": lambda p, a, c=None: float(mme_label(p) == a[0].strip().lower()),
    "wer": _item_error_score(word_errors),
    "cer": _item_error_score(char_errors),
}
LOWER_IS_BETTER = {"wer", "cer"}  # their headline is reported as 100 * max(0, 1 - error rate)


def summarize(metric: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Scores of one group of prediction rows (one task, one metric). `score` is always 0-100, higher
    is better; the metric's own numbers are added beside it."""
    n = len(rows)
    out: dict[str, Any] = {"metric": metric, "n": n}
    if n == 0:
        return {**out, "score": 0.0}
    if metric == "pope":
        out.update(pope_scores([r["prediction"] for r in rows], [r["answers"][0] for r in rows]))
        out["score"] = out["accuracy"]
        categories = sorted({r.get("category") for r in rows if r.get("category")})
        if len(categories) > 1:
            out["categories"] = {c: pope_scores([r["prediction"] for r in rows if r.get("category") == c],
                                                [r["answers"][0] for r in rows if r.get("category") == c])
                                 for c in categories}
    elif metric == "mme":
        out.update(mme_scores(rows))
        cats = out["categories"].values()
        out["score"] = sum(v["score"] for v in cats) / (2 * len(cats))
    elif metric in ("wer", "cer"):
        error_rate = wer if metric == "wer" else cer
        rate = error_rate([r["prediction"] for r in rows], [r["answers"][0] for r in rows])
        out[metric] = 100 * rate
        out["score"] = 100 * max(0.0, 1.0 - rate)
    elif metric == "multiple_choice" and any(r.get("circular_of") for r in rows):
        groups: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            groups[r.get("circular_of") or r["id"]].append(r["score"])
        out["score"] = 100 * sum(all(s == 1.0 for s in g) for g in groups.values()) / len(groups)
        out["n_questions"] = len(groups)
        firsts = [r["score"] for r in rows if str(r["id"]).endswith("@0") or not r.get("circular_of")]
        out["single_pass"] = 100 * sum(firsts) / max(len(firsts), 1)
    else:
        out["score"] = 100 * sum(r["score"] for r in rows) / n
    chance = chance_level(metric, rows)
    if chance is not None:
        out["chance"] = chance
    return out


def chance_level(metric: str, rows: Sequence[dict[str, Any]]) -> float | None:
    """Expected score (0-100) of guessing uniformly from each item's closed answer space (options or
    candidates; open items count 0). None when no item has a closed answer space."""
    if metric == "mme":
        return None
    spaces = [r.get("n_options") or (2 if metric == "pope" else 0) for r in rows]
    if not any(spaces):
        return None
    if metric == "multiple_choice" and any(r.get("circular_of") for r in rows):
        groups: dict[str, float] = {}
        for r, k in zip(rows, spaces):
            key = r.get("circular_of") or r["id"]
            groups[key] = groups.get(key, 1.0) * (1.0 / k)
        return 100 * sum(groups.values()) / len(groups)
    return 100 * sum(1.0 / k if k else 0.0 for k in spaces) / len(spaces)
