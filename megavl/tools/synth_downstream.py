"""megavl-synth-downstream: shapes-retrieval, shapes-VQA and shapes-NLVR2 in the users' formats.

The images are megavl-synth-shapes scenes (same drawing code). Written under --out:
  images/<split>/<split>_NNNNNN.png                 every image of every task
  retrieval_train.json    [{"image", "caption", "image_id"}]       one entry per caption
  retrieval_{val,test}.json [{"image", "caption": [str x captions_per_image]}]
  vqa_{train,val}.json    [{"question_id", "question", "answer": [10], "image", "dataset": "vqa",
                            "answer_type", "question_type"}]
  vqa_test.json           the same without "answer" (the result file must cover it)
  nlvr2_{train,dev,test}.json [{"images": [left, right], "sentence", "label": "True"|"False"}]
Image paths are relative to --out. The ten human answers mix the canonical answer with variants
("2" / "two" / "two shapes", "red" / "Red" / "the red one", "yes" / "yes." / "Yes") and a few wrong
ones, so the official normalisation and the leave-one-out average both matter.

    megavl-synth-downstream --out DIR --seed S [--num-train N] [--num-eval M] [--image-size 64]
Same arguments, same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

from megavl.data.seeds import derive_seed
from megavl.tools.synth_shapes import (COLOURS, POSITION_NAMES, SHAPES, Shape, caption, draw,
                                       relation, sample_shapes)

NUMBER_WORDS = ["zero", "one", "two", "three", "four"]


def plural(word: str, n: int = 2) -> str:
    return word if n == 1 else word + ("es" if word.endswith("s") else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
CAPTIONS_PER_IMAGE = 3


def _write_image(out: str, split: str, index: int, shapes: list[Shape], image_size: int,
                 rng: random.Random) -> str:
    rel = os.path.join("images", split, f"{split}_{index:06d}.png")
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    draw(shapes, image_size, rng).save(path, format="PNG", optimize=False)
    return rel


def captions_of(shapes: list[Shape], rng: random.Random) -> list[str]:
    """Several distinct descriptions of one scene: the compositional caption, a counted
    inventory, and one relation read from the other side."""
    count = NUMBER_WORDS[len(shapes)]
    inventory = " and ".join(f"a {s.colour} {s.kind}" for s in shapes)
    texts = [caption(shapes), f"{count} shape{'s' if len(shapes) > 1 else ''}: {inventory}"]
    if len(shapes) >= 2:
        a, b = shapes[1], shapes[0]
        texts.append(f"a {a.colour} {a.kind} {relation(a, b)} a {b.colour} {b.kind}")
    else:
        s = shapes[0]
        texts.append(f"a lone {s.colour} {s.kind} {POSITION_NAMES[s.row][s.col]}")
    return texts


def human_answers(canonical: str, variants: list[str], wrong: list[str], rng: random.Random
                  ) -> list[str]:
    """Ten annotators: mostly the canonical form, some variants, now and then a wrong answer."""
    out = []
    for _ in range(10):
        r = rng.random()
        out.append(canonical if r < 0.6 or not variants else
                   rng.choice(variants) if r < 0.9 or not wrong else rng.choice(wrong))
    return out


def questions_of(shapes: list[Shape], rng: random.Random) -> list[dict]:
    """(question, canonical answer, variants, wrong answers, answer_type, question_type)."""
    qs = []
    n = len(shapes)
    qs.append(dict(question="how many shapes are there?", answer=str(n),
                   variants=[NUMBER_WORDS[n], f"{n} {plural('shape', n)}",
                             f"{NUMBER_WORDS[n]} {plural('shape', n)}"],
                   wrong=[str(m) for m in range(1, 4) if m != n], answer_type="number",
                   question_type="how many"))
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    unique_kind = [s for s in shapes if kinds.count(s.kind) == 1]
    if unique_kind:
        s = rng.choice(unique_kind)
        qs.append(dict(question=f"what color is the {s.kind}?", answer=s.colour,
                       variants=[s.colour.capitalize(), f"the {s.colour} one", f"{s.colour}."],
                       wrong=[c for c in COLOURS if c != s.colour][:2], answer_type="other",
                       question_type="what color is the"))
    unique_colour = [s for s in shapes if colours.count(s.colour) == 1]
    if unique_colour:
        s = rng.choice(unique_colour)
        qs.append(dict(question=f"what shape is the {s.colour} object?", answer=s.kind,
                       variants=[f"a {s.kind}", f"the {s.kind}", s.kind.capitalize()],
                       wrong=[k for k in SHAPES if k != s.kind][:2], answer_type="other",
                       question_type="what shape is the"))
        qs.append(dict(question=f"where is the {s.colour} {s.kind}?",
                       answer=POSITION_NAMES[s.row][s.col].split(" ", 1)[1].replace("the ", ""),
                       variants=[POSITION_NAMES[s.row][s.col], POSITION_NAMES[s.row][s.col].split(" ", 1)[1]],
                       wrong=["center", "top"], answer_type="other", question_type="where is the"))
    kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    present = any(s.kind == kind and s.colour == colour for s in shapes)
    if rng.random() < 0.5:  # balance yes/no: ask about a shape that is there half of the time
        s = rng.choice(shapes)
        kind, colour, present = s.kind, s.colour, True
    yes, no = ("yes", "no") if present else ("no", "yes")
    qs.append(dict(question=f"is there {article(colour)} {colour} {kind}?", answer=yes,
                   variants=[yes.capitalize(), f"{yes}."], wrong=[no], answer_type="yes/no",
                   question_type="is there a"))
    return qs


def nlvr2_statement(left: list[Shape], right: list[Shape], rng: random.Random) -> tuple[str, bool]:
    kind = rng.choice(SHAPES)
    colour = rng.choice(list(COLOURS))
    nl, nr = sum(s.kind == kind for s in left), sum(s.kind == kind for s in right)
    choice = rng.randrange(4)
    if choice == 0:
        return f"the left image has more {plural(kind)} than the right one", nl > nr
    if choice == 1:
        return (f"both images contain a {colour} shape",
                any(s.colour == colour for s in left) and any(s.colour == colour for s in right))
    if choice == 2:
        total = len(left) + len(right)
        claim = total if rng.random() < 0.5 else rng.choice([t for t in range(2, 7) if t != total])
        return f"there are {NUMBER_WORDS[claim] if claim < 5 else claim} shapes in total", claim == total
    side, shapes = rng.choice([("left", left), ("right", right)])
    return f"the {side} image contains {article(kind)} {kind}", any(s.kind == kind for s in shapes)


def write_all(out: str, seed: int, num_train: int, num_eval: int, image_size: int) -> dict:
    os.makedirs(out, exist_ok=True)
    counts = {}
    splits = {"train": num_train, "val": num_eval, "test": num_eval}
    scenes: dict[str, list[tuple[str, list[Shape]]]] = {}
    for split, n in splits.items():
        rng = random.Random(derive_seed(seed, "synth-downstream", split))
        scenes[split] = []
        for i in range(n):
            shapes = sample_shapes(rng)
            scenes[split].append((_write_image(out, split, i, shapes, image_size, rng), shapes))
    qid = 0
    for split, items in scenes.items():
        rng = random.Random(derive_seed(seed, "synth-downstream-text", split))
        # retrieval
        if split == "train":
            entries = [{"image": rel, "caption": c, "image_id": i}
                       for i, (rel, shapes) in enumerate(items) for c in captions_of(shapes, rng)]
        else:
            entries = [{"image": rel, "caption": captions_of(shapes, rng)} for rel, shapes in items]
        _dump(out, f"retrieval_{split}.json", entries)
        # VQA
        vqa = []
        for rel, shapes in items:
            for q in questions_of(shapes, rng):
                qid += 1
                entry = {"question_id": qid, "question": q["question"], "image": rel,
                         "dataset": "vqa", "answer_type": q["answer_type"],
                         "question_type": q["question_type"]}
                if split != "test":
                    entry["answer"] = human_answers(q["answer"], q["variants"], q["wrong"], rng)
                vqa.append(entry)
        _dump(out, f"vqa_{split}.json", vqa)
        # NLVR2: pairs of consecutive scenes, each pair with two statements
        nlvr = []
        for i in range(0, len(items) - 1, 2):
            (lrel, lshapes), (rrel, rshapes) = items[i], items[i + 1]
            for _ in range(2):
                sentence, truth = nlvr2_statement(lshapes, rshapes, rng)
                nlvr.append({"images": [lrel, rrel], "sentence": sentence,
                             "label": "True" if truth else "False"})
        _dump(out, f"nlvr2_{'dev' if split == 'val' else split}.json", nlvr)
        counts[split] = {"images": len(items), "retrieval_entries": len(entries),
                         "vqa_questions": len(vqa), "nlvr2_pairs": len(nlvr)}
    _dump(out, "stats.json", counts)
    return counts


def _dump(out: str, name: str, data) -> None:
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=None, separators=(",", ":"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavl-synth-downstream",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--num-train", type=int, default=512, help="training images")
    parser.add_argument("--num-eval", type=int, default=128, help="images per val/test split")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.num_train < 2 or args.num_eval < 2 or args.image_size < 8:
        parser.error("--num-train/--num-eval must be >= 2 and --image-size >= 8")
    counts = write_all(args.out, args.seed, args.num_train, args.num_eval, args.image_size)
    for split, c in counts.items():
        print(f"{split}: {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
