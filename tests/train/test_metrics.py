"""Metrics against values worked out by hand on small examples (the working is in each docstring), and against
the reference implementations (seqeval, scikit-learn) on random ones."""

from __future__ import annotations

import math

import pytest

from deltatune.train.metrics import accuracy, bleu, entities, entity_prf, f1, perplexity, rouge_l


def test_accuracy():
    """preds 1 0 1 1 against labels 1 1 1 0: positions 0 and 2 agree -> 2 / 4."""
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_binary_f1_is_f1_of_class_1():
    """preds 1 1 0 0 0, labels 1 0 0 0 0.
    Class 1: tp = 1 (pos 0), fp = 1 (pos 1), fn = 0 -> F1 = 2*1 / (2*1 + 1 + 0) = 2/3.
    (Class 0 would give tp = 3, fp = 0, fn = 1 -> 6/7, and their macro mean 16/21: neither is the binary F1.)"""
    assert f1([1, 1, 0, 0, 0], [1, 0, 0, 0, 0], num_classes=2) == pytest.approx(2 / 3)


def test_macro_f1():
    """preds 0 1 2 2 1 0, labels 0 1 1 2 2 2.
    Class 0: tp = 1 (pos 0), fp = 1 (pos 5), fn = 0          -> 2 / (2 + 1 + 0) = 2/3
    Class 1: tp = 1 (pos 1), fp = 1 (pos 4), fn = 1 (pos 2)  -> 2 / (2 + 1 + 1) = 1/2
    Class 2: tp = 1 (pos 3), fp = 1 (pos 2), fn = 2 (4, 5)   -> 2 / (2 + 1 + 2) = 2/5
    Macro: (2/3 + 1/2 + 2/5) / 3 = (20 + 15 + 12) / 90 = 47/90. A class in neither preds nor labels is left out,
    as scikit-learn does, so num_classes=4 gives the same."""
    preds, labels = [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 2]
    assert f1(preds, labels, num_classes=3) == pytest.approx(47 / 90)
    assert f1(preds, labels, num_classes=4) == pytest.approx(47 / 90)


def test_f1_without_true_positives():
    """Class 1 is predicted once, wrongly, and never present: tp = 0 -> F1 = 0 (not a division by zero)."""
    assert f1([1, 0], [0, 0], num_classes=2) == 0.0


def test_bio_entities():
    """B-PER I-PER O I-LOC I-LOC B-ORG I-PER B-PER B-PER (spans are [start, end)):
    0-2 PER (B then I); 3-5 LOC (an I- after O starts an entity, the next I-LOC continues it); 5-6 ORG;
    6-7 PER (I-PER cannot continue an ORG, so it starts one); 7-8 and 8-9 PER (each B- starts a new one)."""
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "I-PER", "B-PER", "B-PER"]
    assert entities(tags) == {("PER", 0, 2), ("LOC", 3, 5), ("ORG", 5, 6), ("PER", 6, 7), ("PER", 7, 8), ("PER", 8, 9)}
    assert entities(["O", "O"]) == set()


def test_entity_prf():
    """Three sentences, micro-averaged over entities:
    1. true B-PER I-PER O B-LOC = {PER 0-2, LOC 3-4}; pred B-PER O O B-LOC = {PER 0-1, LOC 3-4}: 1 match.
    2. true O B-ORG I-ORG = {ORG 1-3}; pred O I-ORG I-ORG = {ORG 1-3} (I- after O starts it): 1 match.
    3. true O O = {}; pred B-MISC O = {MISC 0-1}: 0 matches.
    tp = 2, predicted = 4, true = 3: P = 1/2, R = 2/3, F1 = 2 * (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7."""
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"], ["O", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "I-ORG", "I-ORG"], ["B-MISC", "O"]]
    prf = entity_prf(pred, true)
    assert prf == pytest.approx({"precision": 1 / 2, "recall": 2 / 3, "f1": 4 / 7})
    assert entity_prf([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_prf_and_f1_equal_seqeval_and_scikit_learn():
    """500 random batches of BIO tags (hyphenated types as WNUT's, stray I- tags, empty predictions) and of class
    labels: the same precision, recall and F1 as seqeval's default (conlleval) scheme and scikit-learn's f1_score."""
    import random

    from seqeval.metrics import f1_score as seq_f1
    from seqeval.metrics import precision_score, recall_score
    from sklearn.metrics import f1_score

    rng = random.Random(0)
    tags = ["O", "B-person", "I-person", "B-creative-work", "I-creative-work", "I-location"]
    for _ in range(500):
        true = [[rng.choice(tags) for _ in range(rng.randint(1, 8))] for _ in range(rng.randint(1, 4))]
        pred = [[rng.choice(tags) for _ in t] for t in true]
        expected = {f.__name__: f(true, pred, zero_division=0) for f in (precision_score, recall_score, seq_f1)}
        got = entity_prf(pred, true)
        assert [got["precision"], got["recall"], got["f1"]] == pytest.approx(list(expected.values()), abs=1e-12)
        k = rng.choice([2, 3, 5])
        labels, preds = [rng.randrange(k) for _ in range(9)], [rng.randrange(k) for _ in range(9)]
        average = "binary" if k == 2 else "macro"
        assert f1(preds, labels, k) == pytest.approx(f1_score(labels, preds, average=average, zero_division=0))


def test_rouge_l():
    """Lin (2004)'s example, reference "police killed the gunman":
    "police kill the gunman": LCS = police the gunman = 3; P = R = 3/4 -> F = 3/4.
    "the gunman kill police": LCS = the gunman = 2; P = R = 2/4 -> F = 1/2.
    Unequal lengths, "the cat was found under the bed" against "the cat was under the bed": LCS = 6 (all of the
    reference); P = 6/7, R = 6/6 -> F = 2 (6/7)(1) / (6/7 + 1) = 12/13. Case is ignored."""
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(3 / 4)
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(1 / 2)
    assert rouge_l("The cat was found under the bed", "the cat was under the BED") == pytest.approx(12 / 13)
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("a b", "c d") == 0.0


def test_bleu_with_brevity_penalty():
    """pred "the cat sat on the mat" (c = 6), reference "the cat sat on the red mat" (r = 7).
    1-grams: the x2, cat, sat, on, mat all in the reference (the x2 there too): 6/6
    2-grams: the cat, cat sat, sat on, on the match; the mat does not: 4/5
    3-grams: the cat sat, cat sat on, sat on the match; on the mat does not: 3/4
    4-grams: the cat sat on, cat sat on the match; sat on the mat does not: 2/3
    Geometric mean (1 * 4/5 * 3/4 * 2/3)^(1/4) = 0.4^(1/4); c < r, so BP = exp(1 - 7/6) = exp(-1/6)."""
    expected = 0.4**0.25 * math.exp(-1 / 6)  # = 0.6732
    assert bleu(["the cat sat on the mat"], [["the cat sat on the red mat"]]) == pytest.approx(expected)


def test_bleu_clips_repeated_words():
    """BLEU-1 of "the the the the" against "the cat on the mat": "the" counts at most twice (its count in the
    reference), so p1 = 2/4; c = 4 < r = 5, BP = exp(1 - 5/4) -> 0.5 exp(-1/4)."""
    assert bleu(["the the the the"], [["the cat on the mat"]], max_n=1) == pytest.approx(0.5 * math.exp(-0.25))


def test_bleu_is_corpus_level():
    """Two sentences whose n-grams all match, so every precision is 1 and only the brevity penalty remains:
    "a b c d" with references of 4 and 8 tokens takes the closest, 4; "a b c d e" against 6 tokens.
    Summed over the corpus c = 4 + 5 = 9, r = 4 + 6 = 10 -> BLEU = exp(1 - 10/9) = exp(-1/9).
    (A mean of sentence scores would be (1 + exp(1 - 6/5)) / 2 instead.)"""
    preds = ["a b c d", "a b c d e"]
    refs = [["a b c d", "a b c d e f g h"], ["a b c d e f"]]
    assert bleu(preds, refs) == pytest.approx(math.exp(-1 / 9))


def test_bleu_closest_reference_ties_go_to_the_shorter():
    """Pred "a b c d" against references of 3 and 5 tokens: both 1 away, the shorter (3) is r; c = 4 > r, so no
    penalty, and every n-gram is in "a b c d e" -> 1.0 (the longer would give exp(1 - 5/4))."""
    assert bleu(["a b c d"], [["a b c", "a b c d e"]]) == pytest.approx(1.0)


def test_bleu_without_a_4gram_match_is_zero():
    """Pred "the cat sat" has no 4-gram at all, so p4 = 0/0 and the geometric mean is 0."""
    assert bleu(["the cat sat"], [["the cat sat"]]) == 0.0
    assert bleu(["x y z w"], [["a b c d"]]) == 0.0


WORDS = ["The", "the", "Golden", "Palace", "is", "a", "coffee", "shop", "near", "café", "Rouge", "3", "5.5", "£20-25",
         "it's", "kid-friendly", "(cheap)", "rated", "1-star", ",", ".", "!", "&amp;", "Sushi/Japanese", "high"]  # fmt: skip


def _sentence(rng, lo: int = 1, hi: int = 14) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return "".join(w if i == 0 or rng.random() < 0.3 else " " + w for i, w in enumerate(words))


@pytest.mark.parametrize("seed", range(12))
def test_bleu_and_rouge_l_equal_sacrebleu_and_rouge_score(seed):
    """The numbers people compare against: sacrebleu's default corpus BLEU and rouge-score's ROUGE-L, on text with
    punctuation, digits, dashes, case, an entity and accents; some corpora miss every 4-gram (exp smoothing)."""
    import random

    import sacrebleu
    from rouge_score import rouge_scorer

    rng = random.Random(seed)
    preds = [_sentence(rng, 1 + seed % 3) for _ in range(rng.randint(1, 6))]
    refs = [[_sentence(rng) for _ in range(rng.randint(1, 3))] for _ in preds]
    if seed % 4 == 0:  # near copies, so the higher orders match too
        refs = [[p.replace("the", "a", 1), *r] for p, r in zip(preds, refs)]
    width = max(map(len, refs))
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    assert bleu(preds, refs) * 100 == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for p, rs in zip(preds, refs):
        for r in rs:
            assert rouge_l(p, r) == pytest.approx(scorer.score(r, p)["rougeL"].fmeasure, abs=1e-12)


def test_perplexity_is_exp_of_the_loss_inf_past_overflow_and_nan_for_a_nan_loss():
    """A diverged run's nan eval loss read as perplexity inf (``nan < 50`` is false), a finite-looking verdict."""
    assert perplexity(math.log(7.5)) == pytest.approx(7.5, rel=1e-12)
    assert perplexity(60.0) == math.inf
    assert math.isnan(perplexity(math.nan))
