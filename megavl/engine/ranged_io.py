"""Exact byte ranges of checkpoint files: one descriptor per file, the kernel's readahead off for it,
`os.pread` of just the bytes asked.

Touching a memory-mapped file pages in the kernel's read-around window (`read_ahead_kb`, 8 MiB on
some VMs, more on Lustre) around every fault: a rank that needs every other half-megabyte of a file
reads all of it. A `pread` of a range with POSIX_FADV_RANDOM on its descriptor reads that range, as
one request. Where a tensor lies in a torch zip archive loaded with `torch.load(mmap=True)` follows
from its address in the mapping (/proc/self/maps); a safetensors file says it in its header.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .checkpoint import CheckpointError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class RangedFile:
    """A file read by exact ranges (`read_into`), its readahead off."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read(self, offset: int, nbytes: int) -> bytes:
        chunks, done = [], 0
        while done < nbytes:
            chunk = os.pread(self.fd, nbytes - done, offset + done)
            if not chunk:
                raise CheckpointError(f"{self.path.parent.name}: {self.path.name} ends at byte {offset + done}, "
                                      f"{offset + nbytes} needed (truncated?)")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def read_into(self, offset: int, out: torch.Tensor) -> None:
        """Fill contiguous `out` with the bytes at `offset` (its dtype's layout, little-endian)."""
        data = self.read(offset, out.numel() * out.element_size())
        if data:
            out.copy_(torch.frombuffer(bytearray(data), dtype=out.dtype))

    def close(self) -> None:
        os.close(self.fd)


def file_mappings(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of each memory mapping of `path` in this process (Linux; [] elsewhere)."""
    target, out = os.path.realpath(path), []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    out.append((start, end, int(fields[2], 16)))
    except OSError:
        return []
    return out


def mapped_offset(tensor: torch.Tensor, mappings: list[tuple[int, int, int]]) -> int | None:
    """The file offset of `tensor`'s first element, for a tensor memory-mapped from a file whose
    `mappings` these are (torch.load(mmap=True)); None where it cannot be told."""
    if tensor.numel() == 0 or not tensor.is_contiguous():
        return None
    ptr = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
    end_ptr = ptr + tensor.numel() * tensor.element_size()
    for start, end, offset in mappings:
        if start <= ptr and end_ptr <= end:
            return offset + ptr - start
    return None


class SafetensorsRanges(RangedFile):
    """A safetensors file: its header once, then any element range of any tensor."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        (size,) = struct.unpack("<Q", self.read(0, 8))
        try:
            header = json.loads(self.read(8, size))
        except ValueError as err:
            raise CheckpointError(f"{self.path.parent.name}: {self.path.name} has a corrupt header ({err})") from None
        header.pop("__metadata__", None)
        self.header, self.data_start = header, 8 + size

    def keys(self) -> list[str]:
        return list(self.header)

    def numel(self, key: str) -> int:
        numel = 1
        for dim in self.header[key]["shape"]:
            numel *= dim
        return numel

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `key`."""
        info = self.header[key]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        size = torch.empty(0, dtype=dtype).element_size()
        begin, end = info["data_offsets"]
        if end - begin != self.numel(key) * size or not 0 <= start <= stop <= self.numel(key):
            raise CheckpointError(f"{self.path.parent.name}: {self.path.name} holds {key} as {info}; "
                                  f"elements [{start}, {stop}) asked")
        out = torch.empty(stop - start, dtype=dtype)
        self.read_into(self.data_start + begin + start * size, out)
        return out
