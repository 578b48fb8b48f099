"""Training images are JPEG-drafted (decoded at a reduced DCT scale) only as far as the smallest
RandomResizedCrop of data.train_crop_scale still finds image_size source pixels per side, in
pre-training and task datasets alike; evaluation resizes the whole image, so image_size is enough."""
import io

import torch
from PIL import Image
from torchvision.transforms import v2

from megavl.config import DataConfig
from megavl.data import build_task_collators, build_task_loader, build_tokenizer, build_train_loader
from megavl.data.shards import iter_raw_samples
from megavl.data.stream import decode_any
from megavl.data.writer import ShardWriter

IMAGE_SIZE = 64
CROP_SCALE = [0.5, 1.0]
SIDE = 512  # its 1/8 DCT draft is IMAGE_SIZE: a draft to image_size leaves crops of ~45 pixels


def jpeg_bytes(side: int = SIDE) -> bytes:
    pixels = torch.randint(0, 256, (side // 8, side // 8, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.numpy()).resize((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_cfg(**overrides) -> DataConfig:
    return DataConfig(**{"image_size": IMAGE_SIZE, "train_crop_scale": CROP_SCALE, "batch_size": 1,
                         "num_workers": 0, "max_text_len": 8, **overrides})


def smallest_crop_side(image: Image.Image, draws: int = 400) -> int:
    """The narrowest source region among many crops the training transform could take."""
    crop = v2.RandomResizedCrop(IMAGE_SIZE, scale=tuple(CROP_SCALE))  # as transforms.train_transform
    pixels = v2.functional.pil_to_tensor(image)
    torch.manual_seed(0)
    boxes = [crop.make_params([pixels]) for _ in range(draws)]
    return min(min(box["height"], box["width"]) for box in boxes)


def test_task_training_images_keep_image_size_pixels_under_the_smallest_crop(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes())
    cfg = make_cfg()
    train_collate, eval_collate = build_task_collators(cfg, build_tokenizer(""))
    kwargs = dict(rank=0, world=1, seed=0)
    train = build_task_loader([str(path)], lambda p: ([p], {}), train_collate, cfg, train=True, **kwargs)
    image = train.dataset[0]["images"][0]
    assert min(image.size) < SIDE  # still drafted: the decode stays cheap
    assert smallest_crop_side(image) >= IMAGE_SIZE
    evaluation = build_task_loader([str(path)], lambda p: ([p], {}), eval_collate, cfg, train=False,
                                   **kwargs)
    assert evaluation.dataset[0]["images"][0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_pretraining_images_keep_image_size_pixels_under_the_smallest_crop(tmp_path):
    with ShardWriter(str(tmp_path), samples_per_shard=10) as writer:
        for i in range(2):
            writer.write(f"s{i}", {"jpg": jpeg_bytes(), "txt": b"a big picture"})
    shard = str(tmp_path / "000000.tar")
    loader = build_train_loader(make_cfg(train_shards=[shard]), rank=0, world_size=1, mlm_prob=0.15,
                                scl_mask_prob=0.4)
    raw = next(iter(iter_raw_samples(shard, read_data=True)))
    image = decode_any(raw, caption_key="caption", max_pixels=10**8,
                       draft_size=loader.plan.draft_size).image
    assert min(image.size) < SIDE
    assert smallest_crop_side(image) >= IMAGE_SIZE
