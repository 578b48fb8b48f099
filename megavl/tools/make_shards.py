"""megavl-make-shards: write webdataset shards (img2dataset layout) + member indexes + stats.json from
  --coco-json FILE --image-root DIR   COCO captions ({"images", "annotations"}) or an ALBEF-style
                                      list [{"image": path, "caption": str | [str], "image_id"}]
  --tsv FILE                          lines "image_path<TAB>caption" (relative to the TSV's folder;
                                      a header line "image<TAB>caption" is allowed)
  --from-wds URLS                     re-shard existing shards (brace pattern; "::" joins several)
into --out DIR as DIR/NNNNNN.tar (+ NNNNNN.tar.idx, the member index) and DIR/stats.json. An image
with one caption is KEY.jpg|png|webp + KEY.txt + KEY.json; an image with several (COCO: 5) is
stored once, as KEY.jpg + KEY.json holding "captions": [...], and serves one sample per caption.
--resize-long N re-encodes images whose long side exceeds N (JPEG, quality 95). Missing or
unreadable inputs are skipped, counted and reported, never fatal.

  --index-only URLS                   write the member index and stats.json of existing shards
                                      (img2dataset's, say) next to them, without rewriting them
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from collections import Counter
from typing import Iterator

from PIL import Image

from megavl.data.decode_image import IMAGE_EXTS
from megavl.data.index import write_index
from megavl.data.shards import (CAPTIONS_KEY, check_shards_exist, expand_urls, iter_raw_samples,
                                read_field, scan_groups)
from megavl.data.writer import ShardWriter, update_stats

logger = logging.getLogger(__name__)
TSV_HEADERS = {"image", "image_path", "filepath", "path", "file"}

# (key, image bytes, image extension, its captions, extra json fields): one stored image
Item = tuple[str, bytes, str, list[str], dict]


def _read_image(path: str, skips: Counter) -> tuple[bytes, str] | None:
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in IMAGE_EXTS:
        skips["not_an_image_extension"] += 1
        return None
    try:
        with open(path, "rb") as f:
            return f.read(), ext
    except OSError:
        skips["missing_image"] += 1
        logger.warning("cannot read image %s", path)
        return None


def coco_items(json_path: str, image_root: str, skips: Counter) -> Iterator[Item]:
    """One item per image with all its captions, in the order images first appear; the key is
    the image's number in that order."""
    with open(json_path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "annotations" in data:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        pairs = [(files.get(a["image_id"]), a["caption"], a["image_id"]) for a in data["annotations"]]
    elif isinstance(data, list):
        pairs = []
        for entry in data:
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            pairs.extend((entry["image"], c, entry.get("image_id", entry["image"])) for c in captions)
    else:
        raise ValueError(f"{json_path}: neither COCO captions nor a list of ALBEF-style entries")
    images: dict[tuple, list[str]] = {}
    for file_name, text, image_id in pairs:
        if file_name is None:
            skips["annotation_without_image"] += 1
            continue
        images.setdefault((file_name, image_id), []).append(text)
    for index, ((file_name, image_id), captions) in enumerate(images.items()):
        image = _read_image(os.path.join(image_root, file_name), skips)
        if image is not None:
            yield f"{index:09d}", image[0], image[1], captions, {"image_id": image_id,
                                                                "image_path": file_name}


def tsv_items(tsv_path: str, skips: Counter) -> Iterator[Item]:
    root = os.path.dirname(os.path.abspath(tsv_path))
    with open(tsv_path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if line_no == 0 and row and row[0].strip().lower() in TSV_HEADERS:
                continue
            if len(row) < 2:
                skips["malformed_tsv_line"] += 1
                logger.warning("%s:%d: expected image<TAB>caption", tsv_path, line_no + 1)
                continue
            path = row[0] if os.path.isabs(row[0]) else os.path.join(root, row[0])
            image = _read_image(path, skips)
            if image is not None:
                yield f"{line_no:09d}", image[0], image[1], [row[1]], {"image_path": row[0]}


def wds_items(pattern: str, skips: Counter) -> Iterator[Item]:
    urls = expand_urls(pattern)
    check_shards_exist(urls)
    for url in urls:
        for raw in iter_raw_samples(url, skips=skips):
            if raw.get("__caption__", 0) > 0:
                continue  # caption j > 0 of a multi-caption group: written with caption 0
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            try:
                meta = json.loads(read_field(raw, "json")) if "json" in raw else {}
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                skips["bad_json"] += 1
                continue
            if "__caption__" in raw:
                captions = [c for c in meta.pop(CAPTIONS_KEY) if isinstance(c, str)]
            else:
                text = meta.get("caption")
                if text is None and "txt" in raw:
                    text = read_field(raw, "txt").decode("utf-8", errors="replace")
                captions = [text] if text is not None else []
            if ext is None or not captions:
                skips["missing_image_or_caption"] += 1
                continue
            meta.pop("caption", None)
            key = raw.get("__group__", raw["__key__"])
            meta["source_key"] = key
            yield key.replace("/", "_"), read_field(raw, ext), ext, captions, meta


def resize_long_side(data: bytes, ext: str, long_side: int) -> tuple[bytes, str]:
    """Downscale so the long side is <= long_side (never upscale); re-encode as JPEG."""
    image = Image.open(io.BytesIO(data))
    if max(image.size) <= long_side:
        return data, ext
    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=95)
    return out.getvalue(), "jpg"


def write_items(items: Iterator[Item], out: str, samples_per_shard: int, resize_long: int,
                skips: Counter) -> dict:
    """Write items as shards (stats.json also covers what was written before an error)."""
    keys: set[str] = set()
    writer = ShardWriter(out, samples_per_shard)
    try:
        for key, data, ext, captions, extra in items:
            if resize_long > 0:
                try:
                    data, ext = resize_long_side(data, ext, resize_long)
                except Exception as err:  # PIL raises many types for bad files
                    skips["corrupt_image"] += 1
                    logger.warning("skipping %s: cannot decode image (%s)", key, err)
                    continue
            if key in keys:  # re-sharded keys from several sources may collide
                key = f"{key}_{len(keys)}"
            keys.add(key)
            if len(captions) == 1:  # the img2dataset layout
                meta = {**extra, "key": key, "caption": captions[0]}
                writer.write(key, {ext: data, "txt": captions[0].encode("utf-8"),
                                   "json": json.dumps(meta).encode()})
            else:  # the image once, one sample per caption (shards.group_captions)
                meta = {**extra, "key": key, CAPTIONS_KEY: captions}
                writer.write(key, {ext: data, "json": json.dumps(meta).encode()})
    finally:
        stats = writer.close()
    return stats


def index_existing(pattern: str, skips: Counter) -> dict[str, int]:
    """Write the member index of every shard of `pattern` next to it and merge the shards' sizes
    into their folders' stats.json; a cut or unreadable shard gets neither (counted in `skips`).
    Returns url -> samples of the shards indexed."""
    urls = expand_urls(pattern)
    check_shards_exist(urls)
    done: dict[str, int] = {}
    by_dir: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
    for url in urls:
        groups = scan_groups(url, skips)
        if groups is None:
            logger.warning("not indexing %s: it is cut or unreadable", url)
            continue
        tar_bytes = os.path.getsize(url)
        write_index(url, groups, tar_bytes)
        done[url] = sum(g.samples for g in groups)
        counts, sizes = by_dir.setdefault(os.path.dirname(url), ({}, {}))
        counts[os.path.basename(url)], sizes[os.path.basename(url)] = done[url], tar_bytes
    for dirname, (counts, sizes) in by_dir.items():
        update_stats(dirname, counts, sizes)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavl-make-shards", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco-json", help="COCO captions JSON or ALBEF-style list")
    source.add_argument("--tsv", help="TSV of image path <TAB> caption")
    source.add_argument("--from-wds", help="existing shards to re-shard (brace pattern)")
    source.add_argument("--index-only", metavar="URLS",
                        help="existing shards to index in place (brace pattern): writes each "
                             "SHARD.tar.idx and the folder's stats.json, rewrites no tar")
    parser.add_argument("--image-root", default="", help="folder the --coco-json paths are under")
    parser.add_argument("--out", help="output folder (not with --index-only)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--resize-long", type=int, default=0, help="max long side; 0 = keep bytes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    skips: Counter = Counter()
    if args.index_only:
        done = index_existing(args.index_only, skips)
        print(f"indexed {sum(done.values())} samples in {len(done)} shards")
        if skips:
            print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skips.items())))
        return 0
    if not args.out:
        parser.error("--out is required")
    if args.coco_json:
        items = coco_items(args.coco_json, args.image_root, skips)
    elif args.tsv:
        items = tsv_items(args.tsv, skips)
    else:
        items = wds_items(args.from_wds, skips)
    stats = write_items(items, args.out, args.samples_per_shard, args.resize_long, skips)
    print(f"wrote {stats['total']} samples in {len(stats['shards'])} shards to {args.out}")
    if skips:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skips.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
