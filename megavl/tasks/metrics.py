"""Metric functions of the downstream tasks (retrieval; VQA below), each tested against hand-computed cases.

Retrieval follows ALBEF's `itm_eval`: a query's rank is the rank of its best-ranked positive, and
R@k is the share of queries whose rank is < k, in percent.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

RETRIEVAL_KS = (1, 5, 10)


def _best_positive_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """scores (Q, C), positives (Q, C) bool with >= 1 True per row -> (Q,) rank of the best positive.

    rank = the number of negatives scored >= the best positive. Without ties this is ALBEF's argsort
    rank; on ties (e.g. the -100 of entries outside the re-ranked top-k) ALBEF's order is arbitrary,
    and here the tie counts against the query, so a result never depends on the sort's tie order.
    """
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positives).sum(dim=1)


def _recalls(ranks: torch.Tensor) -> list[float]:
    return [100.0 * (ranks < k).float().mean().item() for k in RETRIEVAL_KS]


def retrieval_metrics(scores_i2t: torch.Tensor, img2txt: list[list[int]], txt2img: list[int],
                      scores_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """Text retrieval (image queries) and image retrieval (text queries) recall, in percent.

    scores_i2t (N_images, N_texts); img2txt[i] the indices of image i's captions; txt2img[t] the
    image of text t; scores_t2i (N_texts, N_images) scores the text queries (ITM re-ranking scores
    each direction apart), default scores_i2t.T.
    Keys: tr1 tr5 tr10 ir1 ir5 ir10 txt_r_mean img_r_mean r_mean.
    """
    scores_i2t = scores_i2t.detach().float().cpu()
    scores_t2i = scores_i2t.t() if scores_t2i is None else scores_t2i.detach().float().cpu()
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i has shape {tuple(scores_t2i.shape)}, expected ({n_txt}, {n_img})")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"img2txt has {len(img2txt)} entries and txt2img {len(txt2img)} for scores of "
                         f"shape ({n_img}, {n_txt})")
    if any(len(texts) == 0 for texts in img2txt):
        raise ValueError("an image has no caption in img2txt: its rank is undefined")
    positives = torch.zeros(n_img, n_txt, dtype=torch.bool)
    rows = torch.tensor([i for i, texts in enumerate(img2txt) for _ in texts], dtype=torch.long)
    cols = torch.tensor([t for texts in img2txt for t in texts], dtype=torch.long)
    positives[rows, cols] = True
    txt_pos = torch.zeros(n_txt, n_img, dtype=torch.bool)
    txt_pos[torch.arange(n_txt), torch.as_tensor(txt2img, dtype=torch.long)] = True

    tr1, tr5, tr10 = _recalls(_best_positive_ranks(scores_i2t, positives))
    ir1, ir5, ir10 = _recalls(_best_positive_ranks(scores_t2i, txt_pos))
    txt_r_mean, img_r_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {"tr1": tr1, "tr5": tr5, "tr10": tr10, "ir1": ir1, "ir5": ir5, "ir10": ir10,
            "txt_r_mean": txt_r_mean, "img_r_mean": img_r_mean, "r_mean": (txt_r_mean + img_r_mean) / 2}

# ---------------------------------------------------------------------- VQA
# Official metric ports.
#
# VQA accuracy: an exact port of the official evaluation (GT-Vision-Lab/VQA,
# `PythonEvaluationTools/vqaEvaluation/vqaEval.py`, the form ALBEF `vqaTools/` and LAVIS
# `common/vqa_tools/` ship):
#   - the prediction: newlines/tabs -> spaces, strip, processPunctuation, processDigitArticle;
#   - the 10 human answers: processPunctuation only, and only when they are not all identical;
#   - for each human answer, acc = min(1, #matches among the OTHER nine / 3); the question's score is
#     the mean of the ten (leave-one-out); overall and per answer type = 100 x mean over questions.
# The per-type averages use the question's mean (the fix the official repository applied; its oldest
# version appended the last leave-one-out value instead). Quirks of the original are kept on purpose:
# the period regex's "lookbehind" is in fact a lookahead for the text "<=" followed by a digit, the
# punctuation test looks at the unmodified text, and re.UNICODE (32) is passed as sub's `count`.

# The official contraction table, verbatim (it maps apostrophe-less forms to typographic ones).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve",
    "hasnt": "hasn’t", "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve",
    "hes": "he’s", "howd": "how’d", "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve",
    "I’dve": "I’d’ve", "Im": "I’m", "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve",
    "it’dve": "it’d’ve", "itll": "it’ll", "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t",
    "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve", "mightve": "might’ve",
    "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at", "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve",
    "she’s": "she’s", "shouldve": "should’ve", "shouldnt": "shouldn’t",
    "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve", "somebody’d": "somebodyd",
    "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve", "somebodyll": "somebody’ll",
    "somebodys": "somebody’s", "someoned": "someone’d", "someoned’ve": "someone’d’ve",
    "someone’dve": "someone’d’ve", "someonell": "someone’ll", "someones": "someone’s",
    "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s",
    "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve",
    "they’dve": "they’d’ve", "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve",
    "twas": "’twas", "wasnt": "wasn’t", "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've",
    "werent": "weren’t", "whatll": "what’ll", "whatre": "what’re", "whats": "what’s",
    "whatve": "what’ve", "whens": "when’s", "whered": "where’d", "wheres": "where's",
    "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve", "who’dve": "who’d’ve",
    "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll", "whyre": "why’re",
    "whys": "why’s", "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t",
    "wouldnt’ve": "wouldn’t’ve", "wouldn’tve": "wouldn’t’ve", "yall": "y’all",
    "yall’ll": "y’all’ll", "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve",
    "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve", "youd": "you’d", "youd’ve": "you’d’ve",
    "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # verbatim, see the module docstring
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`",
          ",", "?"]  # "!" and "-" are not in the official list (kept)
ANSWER_TYPES = ("yes/no", "number", "other")


def process_punctuation(text: str) -> str:
    """Official processPunctuation: a mark next to a space (or any digit,digit comma in the text)
    is deleted, otherwise replaced by a space; then periods not before a digit are deleted."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # count=32 as in the original


def process_digit_article(text: str) -> str:
    """Official processDigitArticle: lower case, number words -> digits, drop a/an/the,
    contractions from the table."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_prediction(prediction: str) -> str:
    """What the official evaluation compares a predicted answer as."""
    text = prediction.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_score(prediction: str, answers: list[str]) -> float:
    """One question's official accuracy in [0, 1] against its (usually 10) human answers."""
    if not answers:
        raise ValueError("vqa_score needs at least one human answer")
    predicted = normalize_prediction(prediction)
    if len(set(answers)) > 1:  # the official code normalises the human answers only then
        answers = [process_punctuation(a) for a in answers]
    per_answer = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == predicted)
        per_answer.append(min(1.0, matches / 3))
    return sum(per_answer) / len(per_answer)


def _human_answers(annotation: dict) -> list[str]:
    """The 10 answers of an official annotation ({"answers": [{"answer": ..}]}) or of an ALBEF/BLIP
    entry ({"answer": [..]})."""
    if "answers" in annotation:
        return [a["answer"] if isinstance(a, dict) else a for a in annotation["answers"]]
    answer = annotation.get("answer")
    if isinstance(answer, str):
        return [answer]
    if not answer:
        raise ValueError(f"question {annotation.get('question_id')} has no answers")
    return list(answer)


def vqa_accuracy(predictions: dict[int, str], annotations: list[dict]) -> dict:
    """Official accuracy in percent over `annotations` (each with "question_id", the human answers
    and optionally "answer_type"): {"overall", "yes/no", "number", "other"} (+ any other answer type
    present). A type with no question is absent. Every annotated question needs a prediction
    (the official evaluation, like the server, refuses a partial result)."""
    missing = [a["question_id"] for a in annotations if a["question_id"] not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} annotated questions have no prediction, e.g. {missing[:5]}")
    if not annotations:
        raise ValueError("vqa_accuracy needs at least one annotation")
    overall: list[float] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    for ann in annotations:
        score = vqa_score(predictions[ann["question_id"]], _human_answers(ann))
        overall.append(score)
        if "answer_type" in ann:
            by_type[ann["answer_type"]].append(score)
    result = {"overall": 100.0 * sum(overall) / len(overall)}
    for answer_type, scores in by_type.items():
        result[answer_type] = 100.0 * sum(scores) / len(scores)
    return result
