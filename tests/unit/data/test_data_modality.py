"""Mixed image + video training data: the per-step modality schedule against a
slow reference, and the mixed loader on real image and mp4 shards: every micro-step of an optimizer
step is one modality, the streams advance only on their own steps, and a resume on another world
size / micro-batch continues both streams exactly. Ranks are simulated in one process."""
from __future__ import annotations

import json
import os
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from megavl.config import DataConfig
from megavl.data import build_train_loader
from megavl.data.mixed import MixedTrainLoader
from megavl.data.modality import ModalitySchedule, source_modality
from megavl.data.seeds import derive_seed
from megavl.data.sources import Source
from megavl.data.writer import ShardWriter
from megavl.tools.synth_videos import encode_mp4

from shard_files import textured_png as png_bytes

GLOBAL_BATCH = 8


def reference_schedule(share: float, block: int, seed: int, steps: int, order: str = "shuffled") -> list[str]:
    """Obviously correct: block b gets floor((b+1) P p) - floor(b P p) video steps (exact rational),
    at the first places of its seeded permutation (contiguous: of the identity); step by step."""
    p = Fraction(share).limit_denominator(1_000_000)
    out = []
    for b in range(-(-steps // block)):
        n = int((b + 1) * block * p) - int(b * block * p)
        places = list(range(block))
        if order == "shuffled":
            random.Random(derive_seed(seed, "modality", b)).shuffle(places)
        out += ["video" if i in places[:n] else "image" for i in range(block)]
    return out[:steps]


@pytest.mark.parametrize("order", ["shuffled", "contiguous"])
@pytest.mark.parametrize("share,block", [(0.25, 4), (0.3, 20), (0.5, 7), (1 / 3, 10), (0.0, 5), (1.0, 3)])
def test_schedule_matches_reference_and_honours_the_share(share, block, order):
    schedule = ModalitySchedule(share, block, seed=3, order=order)
    steps = 400
    got = [schedule.at(s) for s in range(steps)]
    assert got == reference_schedule(share, block, 3, steps, order)
    assert got == [ModalitySchedule(share, block, 3, order).at(s) for s in range(steps)]  # deterministic
    video = 0
    for s in range(steps + 1):
        assert schedule.steps_before(s) == {"image": s - video, "video": video}  # closed form = count
        if s % block == 0:
            assert abs(video - s * share) < 1 + 1e-9  # within one step of the share at every block end
        assert abs(video - s * share) <= block * max(share, 1 - share) + 1  # and inside a block
        if s < steps:
            video += got[s] == "video"


def test_schedule_does_not_lock_onto_the_curriculum_period():
    """Share 1/2 placed every other step would put every video step in the same fusion mode of the
    alternating curriculum; the seeded places inside a block spread them over both."""
    got = [ModalitySchedule(0.5, 20, seed=0).at(s) for s in range(200)]
    even = sum(m == "video" for s, m in enumerate(got) if s % 2 == 0)
    odd = sum(m == "video" for s, m in enumerate(got) if s % 2 == 1)
    assert even + odd == 100 and min(even, odd) > 25
    assert [ModalitySchedule(0.5, 20, seed=1).at(s) for s in range(200)] != got  # the seed matters


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="share"):
        ModalitySchedule(1.5, 10, 0)
    with pytest.raises(ValueError, match="block"):
        ModalitySchedule(0.5, 0, 0)
    with pytest.raises(ValueError, match="order"):
        ModalitySchedule(0.5, 4, 0, "random")


def test_contiguous_order_switches_twice_per_block():
    got = [ModalitySchedule(0.25, 20, seed=0, order="contiguous").at(s) for s in range(100)]
    assert got[:20] == ["video"] * 5 + ["image"] * 15 and got[20:40] == got[:20]
    assert sum(a != b for a, b in zip(got, got[1:])) == 9  # 2 per block, the last block's end excluded


# ------------------------------------------------------------------------------------ mixed loader
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    out = str(tmp_path_factory.mktemp("mixed"))
    with ShardWriter(out, samples_per_shard=12, prefix="img-") as writer:
        for i in range(24):
            writer.write(f"img{i:03d}", {"png": png_bytes(i), "txt": f"image number {i}".encode()})
    with ShardWriter(out, samples_per_shard=8, prefix="vid-") as writer:
        for c in range(16):
            frames = [np.full((10, 10, 3), (9 * t + 5 * c) % 256, np.uint8) for t in range(4)]
            writer.write(f"vid{c:03d}", {"mp4": encode_mp4(frames, crf=0), "txt": f"clip {c}".encode(),
                                          "json": json.dumps({"image_id": 1000 + c}).encode()})
    return (os.path.join(out, "img-{000000..000001}.tar"), os.path.join(out, "vid-{000000..000001}.tar"))


def make_cfg(shards, **overrides) -> DataConfig:
    base = dict(train_shards=list(shards), batch_size=2, num_workers=0, shuffle_buffer=8, image_size=8,
                max_text_len=8, hflip=True, seed=5, num_frames=2, video_share=0.4, modality_block=5)
    return DataConfig(**{**base, **overrides})


def run_steps(shards, world: int, steps: int, state: dict | None = None, **overrides):
    """`steps` optimizer steps of a `world`-rank run (GLOBAL_BATCH per step): per step the modality
    and the concatenation over ranks and micro-steps of keys and images; the ranks' final states."""
    batch = overrides.pop("batch_size", 2)
    cfg = make_cfg(shards, batch_size=batch, **overrides)
    loaders = [build_train_loader(cfg, rank=r, world_size=world, mlm_prob=0.15, scl_mask_prob=0.4,
                                  global_batch_size=GLOBAL_BATCH, epoch_start_state=state)
               for r in range(world)]
    accum = GLOBAL_BATCH // (batch * world)
    out = []
    first = (state or {}).get("step", 0)  # a single-modality state has no step: those tests fail earlier
    for step in range(first, first + steps):
        modality = loaders[0].modality_at(step)
        keys, images = [], []
        for _ in range(accum):
            micro = [next(loader) for loader in loaders]
            for b in micro:
                clip = b["images"].ndim == 5
                assert clip == (modality == "video"), "a micro-step of another modality than its step"
                keys += b["keys"]
                images.append(b["images"])
        out.append((modality, keys, torch.cat(images)))
    return out, [loader.state_dict() for loader in loaders]


def test_sources_carry_their_modality(shards):
    from megavl.data.shards import expand_urls, shard_sizes
    image_urls, video_urls = (expand_urls(p) for p in shards)
    assert source_modality(Source(image_urls, shard_sizes(image_urls), 1.0)) == "image"
    assert source_modality(Source(video_urls, shard_sizes(video_urls), 1.0)) == "video"


def test_mixed_steps_follow_the_schedule_and_resume_on_another_world_exactly(shards):
    steps = 10
    full, _ = run_steps(shards, world=1, steps=steps, batch_size=4)  # grad_accum 2
    schedule = ModalitySchedule(0.4, 5, seed=5)
    assert [m for m, _, _ in full] == [schedule.at(s) for s in range(steps)]
    assert {m for m, _, _ in full} == {"image", "video"}
    video_keys = [k for m, keys, _ in full if m == "video" for k in keys]
    image_keys = [k for m, keys, _ in full if m == "image" for k in keys]
    assert all(k.startswith("vid") for k in video_keys) and all(k.startswith("img") for k in image_keys)
    # each stream walks its own epochs: 16 clips = 2 video steps per epoch, every clip once per epoch
    assert sorted(video_keys[:16]) == [f"vid{c:03d}" for c in range(16)]

    # the same 10 steps on 2 ranks (grad_accum 1), and on 4 ranks resumed from a 2-rank state at step 4
    two, states = run_steps(shards, world=2, steps=4, batch_size=4)
    assert states[0] == states[1] | {"streams": states[0]["streams"]}  # the same step and schedule
    assert states[0]["step"] == 4
    four, _ = run_steps(shards, world=4, steps=steps - 4, state=states[0], batch_size=1)  # grad_accum 2
    for (m, keys, images), (m2, keys2, images2) in zip(full, two + four, strict=True):
        assert (m2, keys2) == (m, keys)
        torch.testing.assert_close(images2, images, rtol=0, atol=0)  # same frames, crops and flips


def test_resume_state_is_checked(shards):
    _, states = run_steps(shards, world=1, steps=3)
    state = states[0]
    with pytest.raises(ValueError, match="modality schedule changed"):
        run_steps(shards, world=1, steps=1, state=state, video_share=0.5)
    bad = json.loads(json.dumps(state))
    bad["step"] = 4  # streams positioned for step 3
    with pytest.raises(ValueError, match="inconsistent"):
        run_steps(shards, world=1, steps=1, state=bad)
    _, image_states = run_steps(shards[:1], world=1, steps=1, video_share=-1.0)
    with pytest.raises(ValueError, match="single-modality run"):
        run_steps(shards, world=1, steps=1, state=image_states[0])
    with pytest.raises(ValueError, match="mixed image\\+video run"):
        run_steps(shards[:1], world=1, steps=1, state=state, video_share=-1.0)


def test_val_shards_of_both_modalities_are_refused(shards):
    from megavl.data import build_eval_loader
    with pytest.raises(ValueError, match="val_shards mix images and videos"):
        build_eval_loader(make_cfg(shards, val_shards=list(shards)), rank=0, world_size=1)
    assert len(list(build_eval_loader(make_cfg(shards, val_shards=[shards[1]]), rank=0, world_size=1))) == 8


def test_default_share_follows_the_mixture_weights(shards):
    loader = build_train_loader(make_cfg(shards, video_share=-1.0, train_weights=[3.0, 1.0]), rank=0,
                                world_size=1, mlm_prob=0.15, scl_mask_prob=0.4, global_batch_size=4)
    assert isinstance(loader, MixedTrainLoader) and loader.schedule.share == pytest.approx(0.25)
    by_size = build_train_loader(make_cfg(shards, video_share=-1.0), rank=0, world_size=1, mlm_prob=0.15,
                                 scl_mask_prob=0.4, global_batch_size=4)
    assert by_size.schedule.share == pytest.approx(16 / 40)  # 24 images, 16 clips
    with pytest.raises(ValueError, match="every train source holds images"):
        build_train_loader(make_cfg(shards[:1], video_share=0.5), rank=0, world_size=1, mlm_prob=0.15,
                           scl_mask_prob=0.4)


def test_a_sample_of_the_other_kind_in_a_source_is_a_counted_skip(tmp_path):
    with ShardWriter(str(tmp_path), samples_per_shard=8, prefix="v-") as writer:
        for c in range(3):
            frames = [np.full((10, 10, 3), 40 * t + c, np.uint8) for t in range(4)]
            writer.write(f"vid{c}", {"mp4": encode_mp4(frames, crf=0), "txt": b"a clip"})
        writer.write("stray", {"png": png_bytes(0), "txt": b"an image among clips"})
    cfg = make_cfg([str(tmp_path / "v-000000.tar")], video_share=-1.0, batch_size=4)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    batch = next(loader)
    assert batch["images"].shape[:2] == (4, 2) and "stray" not in batch["keys"]
    assert loader.skip_counts()["wrong_modality"] == 1 and loader.repeat_count() == 1


@pytest.mark.parametrize("override,key", [("data.video_share=1.5", "data.video_share"),
                                          ("data.modality_block=0", "data.modality_block"),
                                          ("data.modality_order=random", "data.modality_order")])
def test_config_names_the_bad_mixed_key(override, key):
    from pathlib import Path
    from megavl.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=key):
        load_config(Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml", [override])


# ------------------------------------------------------------------------------------ review fixes
def write_colliding_sources(out: str) -> tuple[str, str]:
    """An image source and a video source that both number their ids from 0 (as megavl-synth-shapes
    and megavl-synth-videos do), two captions per id."""
    with ShardWriter(out, samples_per_shard=12, prefix="cimg-") as writer:
        for i in range(12):
            writer.write(f"img{i:03d}", {"png": png_bytes(i), "txt": f"image {i}".encode(),
                                         "json": json.dumps({"image_id": i // 2}).encode()})
    with ShardWriter(out, samples_per_shard=8, prefix="cvid-") as writer:
        for c in range(8):
            frames = [np.full((10, 10, 3), (9 * t + 5 * c) % 256, np.uint8) for t in range(2)]
            writer.write(f"vid{c:03d}", {"mp4": encode_mp4(frames, crf=0), "txt": f"clip {c}".encode(),
                                          "json": json.dumps({"image_id": c // 2}).encode()})
    return os.path.join(out, "cimg-000000.tar"), os.path.join(out, "cvid-000000.tar")


def test_image_ids_of_different_sources_never_collide(tmp_path):
    """A clip and an image with the same integer id are different images to ITC (batch and queue),
    ITM and SCL; captions of one image within a source still share an id; ids are resume-exact."""
    sources = write_colliding_sources(str(tmp_path))
    ids_of: dict[str, int] = {}
    for loader_ids in _ids_by_key(sources, steps=6):
        ids_of.update(loader_ids)
    assert {k[:3] for k in ids_of} == {"img", "vid"}
    image_ids = {i for k, i in ids_of.items() if k.startswith("img")}
    video_ids = {i for k, i in ids_of.items() if k.startswith("vid")}
    assert not image_ids & video_ids
    for key, image_id in ids_of.items():  # the json id is int(key) // 2: pairs share, others differ
        twins = {k for k, i in ids_of.items() if i == image_id}
        assert twins <= {f"{key[:3]}{2 * (int(key[3:]) // 2) + j:03d}" for j in (0, 1)}
    assert any(len({k for k, i in ids_of.items() if i == v}) == 2 for v in image_ids)
    assert all(0 <= i < 2 ** 63 for i in ids_of.values())
    # a resumed run (another world) hands out the same ids
    _, states = run_steps(sources, world=2, steps=3, batch_size=2)
    resumed = _ids_by_key(sources, steps=3, world=2, state=states[0], first=3)
    assert all(ids_of[k] == i for part in resumed for k, i in part.items())


def _ids_by_key(sources, steps: int, world: int = 1, state: dict | None = None, first: int = 0):
    cfg = make_cfg(sources, batch_size=8 // world)
    loaders = [build_train_loader(cfg, rank=r, world_size=world, mlm_prob=0.15, scl_mask_prob=0.4,
                                  global_batch_size=GLOBAL_BATCH, epoch_start_state=state)
               for r in range(world)]
    out = []
    for _ in range(first, first + steps):
        for loader in loaders:
            batch = next(loader)
            out.append(dict(zip(batch["keys"], batch["image_ids"].tolist())))
    return out


def test_source_modality_skips_a_first_sample_without_media(tmp_path):
    with ShardWriter(str(tmp_path), samples_per_shard=8, prefix="webvid-") as writer:
        writer.write("nomp4", {"txt": b"its mp4 failed to download", "json": b"{}"})
        frames = [np.full((10, 10, 3), 40 * t, np.uint8) for t in range(2)]
        writer.write("clip", {"mp4": encode_mp4(frames, crf=0), "txt": b"a clip"})
    from megavl.data.shards import shard_sizes
    url = str(tmp_path / "webvid-000000.tar")
    assert source_modality(Source([url], shard_sizes([url]), 1.0)) == "video"


def test_source_modality_without_media_in_the_first_samples_names_the_shard(tmp_path):
    from megavl.data.modality import MODALITY_LOOKAHEAD
    with ShardWriter(str(tmp_path), samples_per_shard=64, prefix="bare-") as writer:
        for i in range(MODALITY_LOOKAHEAD):
            writer.write(f"s{i}", {"txt": b"no media"})
        writer.write("late", {"png": png_bytes(0), "txt": b"too late to tell"})
    from megavl.data.shards import shard_sizes
    url = str(tmp_path / "bare-000000.tar")
    with pytest.raises(ValueError, match="bare-000000.tar.*image.*or video"):
        source_modality(Source([url], shard_sizes([url]), 1.0))


def test_clips_for_an_image_only_vision_tower_are_refused_at_start(shards):
    from megavl.data.modality import check_clip_model
    mixed = build_train_loader(make_cfg(shards), rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4,
                               global_batch_size=4)
    images = build_train_loader(make_cfg(shards[:1], video_share=-1.0), rank=0, world_size=1,
                                mlm_prob=0.15, scl_mask_prob=0.4, global_batch_size=4)
    assert mixed.modalities == ("image", "video") and images.modalities == ("image",)
    with pytest.raises(ValueError, match="model.vision.num_frames=1"):
        check_clip_model(mixed.modalities, data_num_frames=2, model_num_frames=1)
    check_clip_model(mixed.modalities, data_num_frames=2, model_num_frames=4)
    check_clip_model(mixed.modalities, data_num_frames=1, model_num_frames=1)  # T=1 clips = images
    check_clip_model(images.modalities, data_num_frames=2, model_num_frames=1)


@pytest.mark.parametrize("share", [1e-9, 1 - 1e-9])
def test_a_share_that_rounds_to_one_modality_is_refused(share):
    with pytest.raises(ValueError, match="no steps"):
        ModalitySchedule(share, 10, 0)


def test_eval_loader_tells_the_modality_once_per_source(shards, monkeypatch):
    import megavl.data.build as build_module
    calls = []
    real = build_module.source_modality

    def counting(source):
        calls.append(source.urls)
        return real(source)

    monkeypatch.setattr(build_module, "source_modality", counting)
    build_module.build_eval_loader(make_cfg(shards, val_shards=[shards[1]]), rank=0, world_size=1)
    assert len(calls) == 1  # two shards, one source
