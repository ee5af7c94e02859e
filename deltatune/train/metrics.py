"""Evaluation metrics: accuracy, F1 (single- and multi-label) and Matthews' correlation, Pearson and Spearman
(regression), entity-level F1 for BIO tagging, ROUGE (1, 2, L, Lsum) and BLEU for generation.

Small, exact implementations of the standard definitions (tested against hand-worked values), so the trainers need
no extra dependency. BLEU and ROUGE-L give the numbers people compare against: sacrebleu's default corpus BLEU
(13a tokens, exp smoothing) and rouge-score's ROUGE-L (without its stemmer, or with it: ``porter_stem`` is nltk's
Porter stemmer, which rouge-score's ``use_stemmer`` runs), tested equal to both libraries.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from ..data.templates import IGNORE_INDEX


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p == t) for p, t in zip(preds, labels)) / max(len(labels), 1)


def f1(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Binary F1 of class 1 when there are two classes, else the macro average of per-class F1."""

    def class_f1(c: int) -> float:
        tp = sum(1 for p, t in zip(preds, labels) if p == c and t == c)
        fp = sum(1 for p, t in zip(preds, labels) if p == c and t != c)
        fn = sum(1 for p, t in zip(preds, labels) if p != c and t == c)
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    if num_classes == 2:
        return class_f1(1)
    present = sorted(set(labels) | set(preds))
    return sum(class_f1(c) for c in present) / max(len(present), 1)


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews' correlation coefficient, K classes alike (sklearn's ``matthews_corrcoef``, GLUE's CoLA metric as
    run_glue reports it, ``matthews_correlation``): 0.0 where either side holds one class only (sklearn's)."""
    n, right = len(labels), sum(int(p == t) for p, t in zip(preds, labels))
    true, pred = Counter(labels), Counter(preds)
    cov_tp = right * n - sum(true[k] * pred[k] for k in true)
    cov_pp = n * n - sum(v * v for v in pred.values())
    cov_tt = n * n - sum(v * v for v in true.values())
    return cov_tp / math.sqrt(cov_pp * cov_tt) if cov_pp * cov_tt else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r (scipy's ``pearsonr`` statistic, GLUE's STS-B metric); nan when either side is constant or holds
    a NaN or an infinity (as scipy's; a NaN prediction would otherwise clamp to r = 1)."""
    if not all(math.isfinite(v) for v in (*x, *y)):
        return float("nan")
    n = len(x)
    mx, my = sum(x) / max(n, 1), sum(y) / max(n, 1)
    dx, dy = [a - mx for a in x], [b - my for b in y]
    sxx, syy = math.fsum(a * a for a in dx), math.fsum(b * b for b in dy)
    if n < 2 or sxx == 0 or syy == 0:
        return float("nan")
    return max(-1.0, min(1.0, math.fsum(a * b for a, b in zip(dx, dy)) / math.sqrt(sxx * syy)))


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank (scipy's ``rankdata``)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (scipy's ``spearmanr``): Pearson's r of the average ranks; nan for a NaN (which has no rank)."""
    if any(math.isnan(v) for v in (*x, *y)):
        return float("nan")
    return pearson(ranks(x), ranks(y))


def multi_label_scores(preds: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """Multi-hot predictions against multi-hot labels, as sklearn scores indicator matrices: micro F1 (over every
    row's every class), macro F1 (the mean over the classes, a class never predicted nor true scoring 0, sklearn's
    ``zero_division`` default) and subset accuracy (rows whose classes are all right, ``accuracy_score``)."""
    n = len(labels[0]) if labels else 0
    tp, fp, fn = [0] * n, [0] * n, [0] * n
    for p, t in zip(preds, labels):
        for c in range(n):
            tp[c] += p[c] and t[c]
            fp[c] += p[c] and not t[c]
            fn[c] += t[c] and not p[c]

    def f(a: int, b: int, c: int) -> float:
        return 2 * a / (2 * a + b + c) if a else 0.0

    return {
        "f1_micro": f(sum(tp), sum(fp), sum(fn)),
        "f1_macro": sum(f(*z) for z in zip(tp, fp, fn)) / max(n, 1),
        "subset_accuracy": accuracy([tuple(p) for p in preds], [tuple(t) for t in labels]),  # type: ignore[misc]
    }


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a tag sequence as seqeval's default (conlleval) scheme reads it, IOB2, IOB1 and
    IOBES alike: B- and S- start an entity, I- and E- continue one of the same type (and start one where they
    cannot continue), E- and S- end it. A tag's first character is its prefix and the text after its first hyphen
    its type, as seqeval splits them."""
    spans, start, prev, prev_kind = set(), 0, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = tag[:1], tag[1:].split("-", 1)[-1] or "_"
        changed = prev not in ("O", ".") and prev_kind != kind
        if changed or prev in ("E", "S") or (prev in ("B", "I") and prefix in ("B", "S", "O")):
            spans.add((prev_kind, start, i))
        starts = prefix in ("B", "S") or (prev in ("E", "S", "O") and prefix in ("E", "I"))
        if starts or (prefix not in ("O", ".") and prev_kind != kind):
            start = i
        prev, prev_kind = prefix, kind
    return spans


def entity_prf(pred_tags: Sequence[Sequence[str]], true_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities (seqeval's default scheme)."""
    tp = n_pred = n_true = 0
    for p, t in zip(pred_tags, true_tags):
        ps, ts = entities(p), entities(t)
        tp += len(ps & ts)
        n_pred += len(ps)
        n_true += len(ts)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f}


def entity_prf_by_type(
    pred_tags: Sequence[Sequence[str]], true_tags: Sequence[Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Per entity type (every type predicted or true, sorted): precision, recall, F1 and the number of true entities,
    as evaluate's seqeval gives them under run_ner's ``--return_entity_level_metrics`` (a ratio with nothing to
    count is 0, seqeval's zero_division)."""
    counts: dict[str, list[int]] = {}  # type -> [true positives, predicted, true]
    for p, t in zip(pred_tags, true_tags):
        ps, ts = entities(p), entities(t)
        for spans, k in ((ps & ts, 0), (ps, 1), (ts, 2)):
            for kind, _, _ in spans:
                counts.setdefault(kind, [0, 0, 0])[k] += 1
    out = {}
    for kind, (tp, n_pred, n_true) in sorted(counts.items()):
        precision, recall = tp / n_pred if n_pred else 0.0, tp / n_true if n_true else 0.0
        f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[kind] = {"precision": precision, "recall": recall, "f1": f, "number": n_true}
    return out


def one_sequence(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of tags as seqeval reads them: one sequence, each row ended by an "O" (a chunk seqeval does not end there,
    a typeless tag such as "X" before the "O", runs on into the next row, as in evaluate's seqeval of run_ner)."""
    return [t for row in rows for t in [*row, "O"]]


def true_entity_types(examples: Sequence[dict], names: Sequence[str]) -> list[str]:
    """The entity types (sorted) in an encoded tag split's true tags (each example's ``labels``: ids into ``names``,
    -100 off a word's first token), read as stage tag's evaluation reads them: the types whose scores seqeval reports
    at every evaluation of the split. A type it holds no entity of is reported only by an evaluation that predicts
    one (``entity_prf_by_type``: every type predicted or true)."""
    rows = [[names[i] for i in e["labels"] if i != IGNORE_INDEX] for e in examples]
    return sorted({kind for kind, _, _ in entities(one_sequence(rows))})


_ROUGE_DROP = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str, stem: bool = False) -> list[str]:
    """rouge-score's tokens: lower-cased, every run of characters other than a-z and 0-9 a separator; with ``stem``
    (rouge-score's ``use_stemmer``) a token of more than 3 characters as its Porter stem (``porter_stem``)."""
    tokens = _ROUGE_DROP.sub(" ", text.lower()).split()
    return [porter_stem(t) if len(t) > 3 else t for t in tokens] if stem else tokens


def rouge_l(prediction: str, reference: str, stem: bool = False) -> float:
    """ROUGE-L F1 (rouge-score's): from the longest common subsequence of ``rouge_tokens``; ``stem`` is rouge-score's
    ``use_stemmer`` (run_summarization's ``rouge.compute(..., use_stemmer=True)``)."""
    return _rouge_l(rouge_tokens(prediction, stem), rouge_tokens(reference, stem))


def _rouge_l(a: list[str], b: list[str]) -> float:
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def rouge_n(prediction: str, reference: str, n: int, stem: bool = False) -> float:
    """ROUGE-N F1 (rouge-score's ``rouge1``, ``rouge2``): clipped n-gram overlap of ``rouge_tokens``."""
    return _rouge_n(rouge_tokens(prediction, stem), rouge_tokens(reference, stem), n)


def _rouge_n(a: list[str], b: list[str], n: int) -> float:
    pa = Counter(tuple(a[i : i + n]) for i in range(len(a) - n + 1))
    rb = Counter(tuple(b[i : i + n]) for i in range(len(b) - n + 1))
    hits = sum(min(c, pa[g]) for g, c in rb.items())
    p, r = hits / max(sum(pa.values()), 1), hits / max(sum(rb.values()), 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_scores(prediction: str, references: Sequence[str], stem: bool = False) -> dict[str, float]:
    """rouge1, rouge2, rougeL and rougeLsum F1 of ``prediction`` against its best reference for each (rouge-score's
    ``score_multi``), as ``rouge_n``, ``rouge_l`` and ``rouge_lsum`` on the stripped texts give them (equal floats),
    each text tokenized and stemmed once (not once per metric and reference: 4.5x the time on E2E's references)."""
    lines = [[rouge_tokens(x, stem) for x in sentences(t).split("\n") if x] for t in (prediction, *references)]
    flat = [[w for line in text for w in line] for text in lines]
    a, best = flat[0], dict.fromkeys(("rouge1", "rouge2", "rougeL", "rougeLsum"), 0.0)
    for b, ref in zip(flat[1:], lines[1:]):
        rouge_l_ = _rouge_l(a, b)
        # one line each: the union LCS is the LCS, the same float as rougeL (and the table's time saved)
        lsum = rouge_l_ if len(lines[0]) == len(ref) == 1 else _rouge_lsum(lines[0], ref)
        for key, score in (("rouge1", _rouge_n(a, b, 1)), ("rouge2", _rouge_n(a, b, 2)), ("rougeL", rouge_l_),
                           ("rougeLsum", lsum)):  # fmt: skip
            best[key] = max(best[key], score)
    return best


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def sentences(text: str) -> str:
    """``text`` stripped, one sentence a line, as run_summarization's ``postprocess_text`` writes it for rougeLsum
    (``"\\n".join(nltk.sent_tokenize(text))``): a sentence ends at ``.``, ``!`` or ``?`` (and closing quotes or
    brackets) before white space. nltk's punkt model, which deltatune does not ship, also keeps abbreviations it
    learned ("Mr. Smith") in one sentence; a text with one sentence scores as its ROUGE-L."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """rouge-score's ``lcs_ind``: the indices into ``ref`` of one longest common subsequence (its backtrack)."""
    t = [[0] * (len(can) + 1) for _ in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        for j in range(1, len(can) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if ref[i - 1] == can[j - 1] else max(t[i - 1][j], t[i][j - 1])
    i, j, out = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_lsum(prediction: str, reference: str, stem: bool = False) -> float:
    """ROUGE-Lsum F1 (rouge-score's ``rougeLsum``): the summary-level LCS over the texts' lines (one sentence a line,
    ``sentences``), each reference line's union LCS with every predicted line, a token counted at most as often as
    both texts hold it."""
    return _rouge_lsum(
        [rouge_tokens(s, stem) for s in prediction.split("\n") if s],
        [rouge_tokens(s, stem) for s in reference.split("\n") if s],
    )


def _rouge_lsum(can: list[list[str]], ref: list[list[str]]) -> float:
    m, n = sum(map(len, ref)), sum(map(len, can))
    if not m or not n:
        return 0.0
    left_r, left_c = Counter(t for s in ref for t in s), Counter(t for s in can for t in s)
    hits = 0
    for r in ref:
        for k in sorted(set().union(*(_lcs_indices(r, c) for c in can))):
            t = r[k]
            if left_c[t] > 0 and left_r[t] > 0:
                hits, left_c[t], left_r[t] = hits + 1, left_c[t] - 1, left_r[t] - 1
    p, r_ = hits / n, hits / m
    return 2 * p * r_ / (p + r_) if p + r_ > 0 else 0.0


_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # a period or comma, unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # or before one
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]
_ENTITIES = {"&quot;": '"', "&amp;": "&", "&lt;": "<", "&gt;": ">"}


def bleu_tokens(text: str) -> list[str]:
    """sacrebleu's default tokens ('13a', as mteval-v13a.pl): case kept, punctuation split off."""
    line = text.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _ENTITIES.items():
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.split()


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) as sacrebleu computes it by default, as a fraction (sacrebleu x 0.01):
    ``bleu_tokens``, several references per example, clipped n-gram counts, brevity penalty against the closest
    reference length (ties to the shorter), and an order with no match counted as 1 / (2^k x its n-grams)."""
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        p = bleu_tokens(pred)
        rs = [bleu_tokens(r) for r in refs]
        pred_len += len(p)
        ref_len += min((abs(len(r) - len(p)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            grams = Counter(tuple(p[i : i + n]) for i in range(len(p) - n + 1))
            best: Counter = Counter()
            for r in rs:
                best |= Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, best[g]) for g, c in grams.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if not any(matches) or min(totals) == 0:
        return 0.0
    log_p, halvings = 0.0, 1
    for m, t in zip(matches, totals):
        if m == 0:
            halvings *= 2
        log_p += math.log(m / t if m else 1 / (halvings * t))
    bp = 1.0 if pred_len >= ref_len else math.exp(1 - ref_len / pred_len)
    return bp * math.exp(log_p / max_n)


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf past a loss of 50 (where exp overflows a float's use); nan for a nan loss."""
    return float("inf") if loss >= 50 else math.exp(loss)


# The Porter stemmer as rouge-score runs it: nltk's ``PorterStemmer()`` (mode NLTK_EXTENSIONS), step by step, each
# rule list applied as nltk's ``_apply_rule_list`` does (the first suffix that matches decides; its condition failing
# leaves the word as it is). Tested equal to nltk on a word list.
_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
              "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
              "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
              "exceed": "exceed", "succeed": "succeed"}  # fmt: skip
_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"), ("bli", "ble"),
          ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"),
          ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"),
          ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"), ("logi", "log")]  # fmt: skip
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", "")]
_STEP4 = ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism", "ate",
          "iti", "ous", "ive", "ize"]  # fmt: skip


def _consonants(word: str) -> list[bool]:
    """Per letter, whether it is a consonant: not a vowel, and a y only after a vowel (or first)."""
    flags: list[bool] = []
    for i, ch in enumerate(word):
        flags.append(ch not in "aeiou" and (ch != "y" or i == 0 or not flags[i - 1]))
    return flags


def _measure(stem: str) -> int:
    """m of [C](VC)^m[V]."""
    return "".join("c" if c else "v" for c in _consonants(stem)).count("vc")


def _vowel(stem: str) -> bool:
    return not all(_consonants(stem))


def _cvc(word: str) -> bool:
    """*o: consonant-vowel-consonant at the end, the last not w, x or y (nltk: or a two-letter vowel-consonant)."""
    c = _consonants(word)
    if len(word) == 2:
        return not c[0] and c[1]
    return len(word) >= 3 and c[-3] and not c[-2] and c[-1] and word[-1] not in "wxy"


def _double(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _consonants(word)[-1]


def _step1b(w: str) -> str:
    if w.endswith("ied"):
        return w[:-3] + ("ie" if len(w) == 4 else "i")
    if w.endswith("eed"):
        return w[:-1] if _measure(w[:-3]) > 0 else w
    stem = next((w[: -len(s)] for s in ("ed", "ing") if w.endswith(s) and _vowel(w[: -len(s)])), None)
    if stem is None:
        return w
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if _double(stem):
        return stem[:-1] if stem[-1] not in "lsz" else stem
    return stem + "e" if _measure(stem) == 1 and _cvc(stem) else stem


def _rules(w: str, rules: list[tuple[str, str]], least: int) -> str:
    for suffix, to in rules:
        if w.endswith(suffix):
            stem = w[: -len(suffix)]
            if suffix == "logi":  # (nltk: the l stays with the stem, so geo-/theo- count)
                return stem + to if _measure(w[:-3]) > least else w
            return stem + to if _measure(stem) > least else w
    return w


@lru_cache(maxsize=1 << 16)
def porter_stem(word: str) -> str:
    """``word`` (lower case) as nltk's ``PorterStemmer().stem`` gives it, the stemmer of rouge-score's
    ``use_stemmer`` (cached: an eval's texts repeat their words)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    w = word
    # 1a
    if w.endswith("ies") and len(w) == 4:
        w = w[:-1]
    else:
        for suffix, to in (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")):
            if w.endswith(suffix):
                w = w[: -len(suffix)] + to
                break
    w = _step1b(w)
    if w.endswith("y") and len(w) > 2 and _consonants(w[:-1])[-1]:  # 1c
        w = w[:-1] + "i"
    if w.endswith("alli") and _measure(w[:-4]) > 0:  # 2 (nltk: alli first, then step 2 again)
        w = w[:-2]
    w = _rules(w, _STEP2, 0)
    w = _rules(w, _STEP3, 0)
    for suffix in _STEP4:  # 4
        if w.endswith(suffix):
            stem = w[: -len(suffix)]
            if _measure(stem) > 1 and (suffix != "ion" or stem.endswith(("s", "t"))):
                w = stem
            break
    if w.endswith("e") and (_measure(w[:-1]) > 1 or _measure(w[:-1]) == 1 and not _cvc(w[:-1])):  # 5a
        w = w[:-1]
    if w.endswith("ll") and _measure(w[:-1]) > 1:  # 5b
        w = w[:-1]
    return w
