"""Read a ``*.safetensors`` file tensor by tensor straight into tensors that already exist.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page a tensor
is copied from stays in the process's resident set until the file is closed, so loading
held the file and the parameters at once (2x the weights' bytes at the peak). Here each
tensor's bytes are read with plain file reads into its parameter's own memory when the
dtype and device match (no second copy at all), else slice by slice through one temporary
of at most 64 MiB, converted into the parameter. Reads go through the page cache,
which the kernel can drop under pressure and which is not this process's RSS.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian N, N bytes
of JSON header ``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__"}``,
then the data, offsets relative to its start. Every problem with a file is one ValueError
that names it.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit
CHUNK_BYTES = 64 * 2**20  # the largest temporary a dtype or device conversion holds


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: where its bytes are (absolute offsets) and what they are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> list[Entry]:
    """The file's tensors in file order. Raises ValueError for a file that is not
    safetensors, whose header is broken, or that is shorter than its header says."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file, or is truncated "
                             f"({size:,} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (8 + n + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a broken header entry "
                             f"{info!r}") from None
        want = dtype.itemsize * _numel(shape)
        if end - start != want or start < 8 + n:
            raise ValueError(f"{path}: tensor {name!r} spans {end - start:,} bytes, its "
                             f"shape and dtype need {want:,}")
        if end > size:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte "
                             f"{end:,}, the file has {size:,}")
        entries.append(Entry(name, dtype, shape, start, end))
    return sorted(entries, key=lambda e: e.start)


def load_into(path: Path, targets: dict[str, torch.Tensor]) -> set[str]:
    """Fill ``targets[name]`` (existing tensors, any device and dtype) with the file's tensor
    of that name, converted to the target's dtype. Names the file has and ``targets`` lacks
    are skipped; returns the names filled. Raises ValueError on a shape mismatch (nothing
    after it is read) or a broken file."""
    entries = [e for e in read_header(path) if e.name in targets]
    done = set()
    with open(path, "rb", buffering=0) as fh:
        for e in entries:
            dst = targets[e.name]
            if tuple(dst.shape) != e.shape:
                raise ValueError(f"{path}: {e.name} has shape {e.shape}, the config "
                                 f"implies {tuple(dst.shape)}")
            if dst.device.type == "cpu" and dst.dtype == e.dtype and dst.is_contiguous():
                _read_exact(fh, e.start, dst, path)  # straight into the parameter
            else:
                _read_converted(fh, e, dst, path)
            done.add(e.name)
    return done


def _read_converted(fh, e: Entry, dst: torch.Tensor, path: Path) -> None:
    """Read ``e`` into ``dst`` of another dtype or device through one CPU temporary of at
    most CHUNK_BYTES, slice by slice along dim 0, so the peak stays near the weights'
    bytes even for a vocab-sized embedding."""
    flat_src = e.shape == () or e.shape[0] == 0
    rows = 1 if flat_src else e.shape[0]
    row_bytes = (e.end - e.start) // rows if rows else 0
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    tmp = torch.empty((min(step, rows), *e.shape[1:]) if not flat_src else e.shape,
                      dtype=e.dtype)
    with torch.no_grad():
        for i in range(0, rows, step):
            n = min(step, rows - i)
            part = tmp if flat_src else tmp[:n]
            _read_exact(fh, e.start + i * row_bytes, part, path)
            (dst if flat_src else dst[i:i + n]).copy_(part)


def _read_exact(fh, offset: int, out: torch.Tensor, path: Path) -> None:
    """Read ``out.nbytes`` bytes at ``offset`` into ``out``'s memory (CPU, contiguous)."""
    nbytes = out.numel() * out.element_size()
    if nbytes == 0:
        return
    view = memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
    fh.seek(offset)
    got = 0
    while got < nbytes:  # an unbuffered read may return fewer bytes than asked
        n = fh.readinto(view[got:])
        if not n:
            raise ValueError(f"{path} is truncated: it ended while reading a tensor")
        got += n


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
