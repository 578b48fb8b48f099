"""Files on stable storage before a marker vouches for them.

A file is written under a temporary name in its directory and renamed over its final name, so a
reader never sees half of it under that name. It is on stable storage once fsynced, here
(`sync=True`) or later with `fsync_files`, which a writer of many files calls once for all of them:
an fsync in the middle of other writes stalls them (ext4 commits its journal, flushing every file's
dirty pages with it), and fsyncs of several files run in parallel. The directory is fsynced by
whoever needs its entries durable (one fsync for many renames). Without the fsyncs a rename can reach
the disk (or a Lustre/NFS server) before the data it names: after a node crash a "complete"
checkpoint would hold zeros or short files. On a network filesystem fsync flushes only the calling
client's dirty pages, so each process fsyncs the files it wrote.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: list[Path], threads: int = 8) -> None:
    """fsync each of `paths`, several at once (fsync releases the GIL; a network filesystem serves
    them in parallel)."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        list(pool.map(fsync_file, paths))


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; their metadata is synchronous
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_bytes(path: Path, data: bytes, sync: bool = True) -> None:
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj, sync: bool = True) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), sync)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors accepts them: contiguous, CPU, no two sharing storage (only those
    that do are copied; the others are written from their own memory)."""
    out, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in storages:
            value = value.clone()
        storages.add(storage)
        out[key] = value
    return out


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], sync: bool = True) -> None:
    """`tensors` as a safetensors file. The caller must not change them until this returns."""
    tmp = _temporary(path)
    save_file(_unshared(tensors), str(tmp))
    if sync:
        fsync_file(tmp)
    os.replace(tmp, path)
