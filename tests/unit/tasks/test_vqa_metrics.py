"""megavl.tasks.metrics VQA functions: hand-computed cases and a transcription of the official
evaluation loop (dict answers with answer_id, as in the v2 annotation files)."""
import random
import re

import pytest

from megavl.tasks.metrics import (normalize_prediction, process_digit_article, process_punctuation,
                                  vqa_accuracy, vqa_score)


def _official(pred, gt_answers):
    """The official VQAEval.evaluate body for one question, transcribed statement by statement."""
    answers = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(gt_answers)]
    res_ans = pred.replace("\n", " ").replace("\t", " ").strip()
    res_ans = process_digit_article(process_punctuation(res_ans))
    if len({a["answer"] for a in answers}) > 1:
        for d in answers:
            d["answer"] = process_punctuation(d["answer"])
    accs = []
    for datum in answers:
        others = [item for item in answers if item != datum]
        matching = [item for item in others if item["answer"] == res_ans]
        accs.append(min(1, float(len(matching)) / 3))
    return float(sum(accs)) / len(accs)


@pytest.mark.parametrize("k,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_gives_the_soft_score_table(k, expected):
    # k of 10 humans said "2": the humans who said it see k-1 others, the rest see k.
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_score("2", answers) == pytest.approx(expected)


def test_normalisation_hand_cases():
    assert normalize_prediction("Two") == "2"
    assert normalize_prediction("the dog.") == "dog"
    assert normalize_prediction(" a  red circle\n") == "red circle"
    assert normalize_prediction("yes!") == "yes!"          # "!" is not in the official list
    assert normalize_prediction("dont") == "don’t"          # the table's typographic apostrophe
    assert process_punctuation("it's") == "it s"            # no space beside it: becomes a space
    assert process_punctuation("1,000") == "1000"           # a digit,digit comma: marks deleted
    assert process_punctuation("3.5") == "3.5"              # a period before a digit stays
    assert process_punctuation("end.") == "end"
    # prediction "two circles" vs humans "2": no match (only the prediction loses its article)
    assert vqa_score("two circles", ["2"] * 10) == 0.0
    # all ten identical: the human answers are NOT normalised, so "two" never matches
    assert vqa_score("two", ["two"] * 10) == 0.0
    assert vqa_score("two", ["2"] * 10) == 1.0
    # differing answers get punctuation processing: "yes." counts as "yes"
    assert vqa_score("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_matches_the_official_loop_on_random_variants():
    rng = random.Random(0)
    pool = ["2", "two", "two circles", "the red one", "red", "Red", "yes", "yes.", "no", "1,000",
            "it's red", "none", "0", "a circle", "circle", "3.5", "left (top)"]
    for _ in range(500):
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool)
        assert vqa_score(pred, answers) == _official(pred, answers), (pred, answers)


def test_accuracy_overall_and_per_type():
    anns = [
        {"question_id": 1, "answers": [{"answer": "yes", "answer_id": i} for i in range(10)],
         "answer_type": "yes/no"},
        {"question_id": 2, "answer": ["2"] * 3 + ["3"] * 7, "answer_type": "number"},
        {"question_id": 3, "answer": ["red"] * 10, "answer_type": "other"},
        {"question_id": 4, "answer": ["blue"] * 10, "answer_type": "other"},
    ]
    preds = {1: "Yes", 2: "two", 3: "red", 4: "green"}
    acc = vqa_accuracy(preds, anns)
    assert acc["yes/no"] == pytest.approx(100.0)
    assert acc["number"] == pytest.approx(90.0)
    assert acc["other"] == pytest.approx(50.0)
    assert acc["overall"] == pytest.approx((1 + 0.9 + 1 + 0) / 4 * 100)
    with pytest.raises(ValueError, match="no prediction"):
        vqa_accuracy({1: "yes"}, anns)
    with pytest.raises(ValueError, match="at least one"):
        vqa_score("yes", [])
