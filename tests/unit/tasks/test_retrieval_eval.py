"""Retrieval evaluation: the ALBEF metrics against hand-computed cases and a loop port of itm_eval,
the batched scorer against a plain per-query evaluation (retrieval_cases.py), and the
2-rank ZeRO-3 sharded path against the single-process one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from launch_helpers import run_ranks
from retrieval_cases import K, clip_batches, dense_batches, pair_batches, reference_evaluate, tiny_config, tiny_student

from megavl.tasks.pretrain_eval import eval_fusion_mode, evaluate_retrieval
from megavl.tasks.metrics import retrieval_metrics
from megavl.tasks.retrieval_eval import NOT_RERANKED, retrieval_scores

WORKER = Path(__file__).with_name("retrieval_eval_worker.py")


# ------------------------------------------------------------------------------ metrics
def test_retrieval_metrics_hand_computed():
    # 3 images, 4 texts; image 0 has texts 0 and 1, image 1 text 2, image 2 text 3
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3],    # best positive (text 1) ranks 0
                           [0.8, 0.7, 0.6, 0.1],    # text 2 ranks 2
                           [0.9, 0.2, 0.4, 0.3]])   # text 3 ranks 2 (0.9 and 0.4 above it)
    img2txt, txt2img = [[0, 1], [2], [3]], [0, 0, 1, 2]
    m = retrieval_metrics(scores, img2txt, txt2img)
    # text queries (columns): text0 -> image0 ranks 2 (0.8, 0.9 above), text1 -> ranks 0,
    # text2 -> image1 ranks 0 (0.6 > 0.5, 0.4), text3 -> image2 ranks 0 (0.3 ties... 0.3 vs 0.3 vs 0.1)
    assert m["tr1"] == pytest.approx(100 / 3) and m["tr5"] == pytest.approx(100.0)
    # text3's column: image0 0.3, image1 0.1, image2 0.3: the tie with a negative counts against it -> rank 1
    assert m["ir1"] == pytest.approx(50.0) and m["ir5"] == pytest.approx(100.0) and m["ir10"] == 100.0
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["img_r_mean"] == pytest.approx(250 / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    assert sorted(m) == sorted(["tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "txt_r_mean", "img_r_mean", "r_mean"])
    # a separate t2i matrix is used for the text queries, and ranks beyond 5 miss R@5
    t2i = torch.zeros(4, 3)
    t2i[torch.arange(4), torch.tensor(txt2img)] = 1.0
    assert retrieval_metrics(scores, img2txt, txt2img, t2i)["ir1"] == 100.0
    big = torch.arange(12.0).repeat(2, 1)  # 2 images x 12 texts; image 0's text is the 7th best
    m = retrieval_metrics(big, [[5], [11]], [0] * 6 + [1] * 6)
    assert (m["tr1"], m["tr5"], m["tr10"]) == (50.0, 50.0, 100.0)


def _albef_itm_eval(scores_i2t, scores_t2i, img2txt, txt2img):
    """ALBEF's itm_eval (Retrieval.py), ported line by line."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            rank = min(rank, np.where(inds == i)[0][0])
        ranks[index] = rank
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return tr, ir


def test_retrieval_metrics_match_albef_loop_on_random_scores():
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 30, 70
    txt2img = torch.randint(0, n_img, (n_txt,), generator=g)
    txt2img[:n_img] = torch.arange(n_img)  # every image has a caption
    img2txt = [torch.nonzero(txt2img == i).flatten().tolist() for i in range(n_img)]
    i2t, t2i = torch.randn(n_img, n_txt, generator=g), torch.randn(n_txt, n_img, generator=g)
    i2t[:, :5] += 2 * (txt2img[:5][None] == torch.arange(n_img)[:, None])  # some hits
    m = retrieval_metrics(i2t, img2txt, txt2img.tolist(), t2i)
    tr, ir = _albef_itm_eval(i2t.numpy(), t2i.numpy(), img2txt, txt2img.tolist())
    assert [m["tr1"], m["tr5"], m["tr10"]] == pytest.approx(tr)
    assert [m["ir1"], m["ir5"], m["ir10"]] == pytest.approx(ir)


def test_retrieval_metrics_bad_input():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.zeros(2, 2), [[0, 1], []], [0, 0])
    with pytest.raises(ValueError, match="scores_t2i has shape"):
        retrieval_metrics(torch.zeros(2, 2), [[0], [1]], [0, 1], torch.zeros(2, 3))


# --------------------------------------------------------------- scorer vs per-query loop
@pytest.fixture(scope="module")
def student():
    return tiny_student().student


@pytest.mark.parametrize("mode", ["two", "single"])
def test_batched_scores_and_recalls_equal_the_per_query_loop(student, mode):
    pairs = pair_batches()
    for k in (0, K):
        ref, ref_i2t, ref_t2i, ref_ids = reference_evaluate(student, pairs, torch.device("cpu"), itm_rerank_k=k,
                                                            mode=mode)
        got = evaluate_retrieval(student, pairs, torch.device("cpu"), itm_rerank_k=k, mode=mode, pair_batch=13)
        for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "num_images", "num_texts"):
            assert got[key] == pytest.approx(ref[key], abs=1e-12), (k, key)
        # the score matrices: the reference's rows are images in first-seen order, ours by image id
        images, texts = dense_batches(pairs)
        i2t, t2i = retrieval_scores(student, images, texts, device=torch.device("cpu"), dtype=torch.float32,
                                    k=k, mode=mode, rerank="itm" if k else "none", pair_batch=13)
        order = ref_ids.argsort()
        ref_i2t, ref_t2i = ref_i2t[order], ref_t2i[order].t()
        if k:
            assert ((i2t == NOT_RERANKED) == torch.isinf(ref_i2t)).all()  # the same top-k entries
            assert ((t2i == NOT_RERANKED) == torch.isinf(ref_t2i)).all()
            ref_i2t = ref_i2t.masked_fill(torch.isinf(ref_i2t), NOT_RERANKED)
            ref_t2i = ref_t2i.masked_fill(torch.isinf(ref_t2i), NOT_RERANKED)
        torch.testing.assert_close(i2t, ref_i2t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t2i, ref_t2i, atol=1e-5, rtol=1e-5)


def test_itm_plus_itc_adds_the_similarity_and_bad_arguments_fail(student):
    images, texts = dense_batches(pair_batches())
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, mode="two")
    sim, _ = retrieval_scores(student, images, texts, k=0, rerank="none", **kw)
    itm, itm_t2i = retrieval_scores(student, images, texts, k=K, rerank="itm", **kw)
    both, both_t2i = retrieval_scores(student, images, texts, k=K, rerank="itm+itc", **kw)
    top = itm != NOT_RERANKED
    torch.testing.assert_close(both[top], itm[top] + sim[top])
    top = itm_t2i != NOT_RERANKED
    torch.testing.assert_close(both_t2i[top], itm_t2i[top] + sim.t()[top])
    for bad, match in [({"rerank": "itc"}, "rerank"), ({"mode": "three"}, "mode"), ({"k": 0}, "k must")]:
        with pytest.raises(ValueError, match=match):
            retrieval_scores(student, images, texts, **{**kw, "k": K, "rerank": "itm", **bad})


def test_eval_fusion_mode_follows_the_curriculum():
    from megavl.config import CurriculumConfig

    alt = CurriculumConfig()
    assert eval_fusion_mode("auto", True, alt) == "two"
    assert eval_fusion_mode("auto", False, alt) == "single"
    assert eval_fusion_mode("single", True, alt) == "single"
    only_single = CurriculumConfig(cycle=[["single", 1]])
    assert eval_fusion_mode("auto", True, only_single) == "single"
    itm_single = CurriculumConfig(objectives_two=["itc", "mlm"])  # ITM trained in single-stream steps only
    assert eval_fusion_mode("auto", True, itm_single) == "single"


# ---------------------------------------------------------------- 2 ranks, ZeRO-3, uneven shares
@pytest.mark.slow
def test_two_rank_zero3_scores_equal_one_process(student, tmp_path):
    run_ranks(2, [WORKER, tmp_path], timeout=480)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    pairs = pair_batches()
    images, texts = dense_batches(pairs)
    cpu = torch.device("cpu")
    for rerank in ("none", "itm", "itm+itc"):
        want = retrieval_scores(student, images, texts, device=cpu, dtype=torch.float32, k=K, mode="two",
                                rerank=rerank)
        for r in ranks:
            for got, ref in zip(r[f"scores/{rerank}"], want):
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][f"scores/{rerank}"], ranks[1][f"scores/{rerank}"]))
    clip_model = tiny_student(tiny_config("model.vision.num_frames=2")).student
    want = retrieval_scores(clip_model, *clip_batches(), device=cpu, dtype=torch.float32, k=3, mode="two")
    for r in ranks:  # every clip on rank 0, none on rank 1
        for got, ref in zip(r["scores/clips"], want):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for mode in ("two", "single"):
        ref = reference_evaluate(student, pairs, cpu, itm_rerank_k=K, mode=mode)[0]
        for r in ranks:
            got = r[f"metrics/{mode}"]
            for key in ref:
                assert got[key] == pytest.approx(ref[key], abs=1e-12), (mode, key)
