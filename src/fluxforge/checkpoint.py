"""Safetensors files read strictly, one tensor at a time, and modules filled from them by a key plan.

A *plan* maps each module key to its `Source` in the checkpoint (a key, and the reshaping on the way in);
`fluxforge.bfl` writes plans for BFL's layouts, `fluxforge.weights` uses them and the identity plan.

Memory: the files are read with plain `readinto` calls into one fresh buffer per tensor, never memory
mapped. A mapping's touched pages stay resident (and counted in the process's RSS) for as long as the file is
open, so reading a whole checkpoint through mmap holds the file *and* the loaded copy at the end; here the
file pages stay in the OS page cache, which the kernel can drop, and the process holds each tensor once.
The buffers come from torch's allocator (64-byte aligned): safetensors' mapped buffers are only 8-byte
aligned, and BLAS kernels sum in another order on unaligned memory (results then differ in the last bits).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fluxforge.errors import CheckpointError

PathLike = str | Path

DTYPES = {  # safetensors dtype names -> torch dtypes
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HEADER_LIMIT = 100 * 2**20  # the format caps the JSON header at 100 MB


@dataclass(frozen=True)
class Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"
    start: int  # byte offset of the data in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class Tensors(Mapping[str, Entry]):
    """The tensors of one checkpoint (a file, or shards): key -> file, shape, dtype from the headers."""

    def __init__(self, entries: dict[str, Entry], where: Path) -> None:
        self._entries = entries
        self.where = where

    def __getitem__(self, key: str) -> Entry:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_file(cls, path: PathLike) -> Tensors:
        path = Path(path)
        return cls(read_header(path), path)

    @classmethod
    def from_folder(cls, folder: PathLike, stem: str) -> Tensors:
        """`{stem}.safetensors`, or the shards named by `{stem}.safetensors.index.json`."""
        folder = Path(folder)
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            return cls.from_file(single)
        if not index.is_file():
            found = sorted(p.name for p in folder.glob("*.safetensors*")) if folder.is_dir() else []
            raise CheckpointError(
                f"no weights in {folder}: expected {single.name} or {index.name}"
                + (f" (found {', '.join(found)})" if found else ""),
                path=str(folder),
            )
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"unreadable shard index ({exc})", path=str(index)) from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise CheckpointError(
                f"{len(absent)} of {len(shards)} shards named by the index are missing: {', '.join(absent)}",
                path=str(index),
                missing=[k for k, s in weight_map.items() if s in absent],
            )
        entries: dict[str, Entry] = {}
        for shard in shards:
            entries.update(read_header(folder / shard))
        listed_elsewhere = [k for k, s in weight_map.items() if k not in entries or entries[k].file.name != s]
        if listed_elsewhere:
            raise CheckpointError(
                "the shard index names tensors that are not in the shard it points to",
                path=str(index),
                missing=listed_elsewhere,
            )
        return cls(entries, index)

    def nbytes(self, dtype: torch.dtype | None = None, keys: Iterable[str] | None = None) -> int:
        """Bytes of the floating tensors in `dtype` (None: as stored), plus every other tensor as stored;
        of `keys` only, when given."""
        total = 0
        for e in self._entries.values() if keys is None else (self._entries[k] for k in keys):
            stored = e.torch_dtype
            cast = dtype if dtype is not None and stored.is_floating_point else stored
            total += e.nbytes // stored.itemsize * cast.itemsize
        return total

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors one at a time, in the order asked, each in a buffer of its own: the caller can
        convert and drop each before the next is read, so the process holds only what it keeps."""
        handles: dict[Path, object] = {}
        try:
            for key in keys:
                entry = self._entries[key]
                if entry.file not in handles:
                    handles[entry.file] = open(entry.file, "rb", buffering=0)  # noqa: SIM115
                yield key, _read_tensor(handles[entry.file], entry)
        finally:
            for handle in handles.values():
                handle.close()


def _read_tensor(handle, entry: Entry) -> torch.Tensor:
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    handle.seek(entry.start)
    done = 0
    while done < entry.nbytes:  # readinto may return less than asked (large reads, pipes)
        n = handle.readinto(view[done:])
        if not n:
            raise CheckpointError(
                f"the file ends inside tensor data ({done} of {entry.nbytes} bytes read); it may be "
                "truncated or still downloading",
                path=str(entry.file),
            )
        done += n
    return buffer.view(entry.torch_dtype).reshape(entry.shape)


def read_header(path: Path) -> dict[str, Entry]:
    """Every tensor's shape, dtype and byte range, checked against the file's size."""
    header, base, data_size, bad = _header(path)
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r} has no dtype, shape and data_offsets") from None
        if dtype not in DTYPES:
            raise bad(f"tensor {key!r} has dtype {dtype}, which fluxforge does not read")
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise bad(f"tensor {key!r}: bytes {begin}..{end} do not hold {list(shape)} {dtype} in the file")
        entries[key] = Entry(path, shape, dtype, base + begin, end - begin)
    return entries


def read_metadata(path: Path) -> dict[str, str]:
    """The file's free-form "__metadata__" strings (LoRA files keep their training config there)."""
    metadata = _header(path)[0].get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _header(path: Path) -> tuple[dict, int, int, Callable[[str], CheckpointError]]:
    if not path.is_file():
        raise CheckpointError("file not found", path=str(path))

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"not a readable safetensors file ({why}); it may be truncated or still downloading",
            path=str(path),
        )

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(_HEADER_LIMIT, size - 8):
            raise bad(f"header length {length} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    return header, 8 + length, size - 8 - length, bad


def stored_dtype(tensors: Mapping[str, Entry]) -> torch.dtype:
    """The floating dtype most of the checkpoint's tensors are stored in."""
    counts: dict[torch.dtype, int] = {}
    for entry in tensors.values():
        if entry.torch_dtype.is_floating_point:
            counts[entry.torch_dtype] = counts.get(entry.torch_dtype, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Strict loading of one module


@dataclass(frozen=True)
class Source:
    """Where one module tensor comes from in a checkpoint, and how it is reshaped on the way."""

    key: str
    part: tuple[int, int] | None = None  # (i, n): the i-th of n equal row blocks of a fused weight
    swap_halves: bool = False  # exchange the two row halves: BFL (shift; scale) -> (scale; shift)
    squeeze: bool = False  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        if self.part is not None:
            stored = (stored[0] // self.part[1], *stored[1:])
        return stored[:2] if self.squeeze else stored

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if self.part is not None:
            t = t.chunk(self.part[1], dim=0)[self.part[0]]
        if self.swap_halves:
            a, b = t.chunk(2, dim=0)
            t = torch.cat([b, a], dim=0)
        return t.flatten(1) if self.squeeze else t


Plan = dict[str, Source]  # module key -> source
_OPTIONAL = ("num_batches_tracked",)  # BatchNorm's counter: absent from BFL files, rebuilt as 0


def load_module(
    build: Callable[[], nn.Module],
    tensors: Tensors,
    plan: Plan | None = None,
    *,
    ignore: Callable[[str], bool] = lambda key: False,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    what: str,
    variant: str | None = None,
) -> nn.Module:
    """Build a module on the meta device and fill it strictly from `tensors`.

    `plan` maps module keys to their sources (identity when None). Checkpoint keys that no source uses
    are errors unless `ignore(key)`. Floating tensors are cast to `dtype` (None: as stored)."""
    with torch.device("meta"):
        module = build()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    plan = plan if plan is not None else {k: Source(k) for k in expected}
    missing, mismatched = [], []
    for key, shape in expected.items():
        src = plan.get(key)
        if src is None or src.key not in tensors:
            if not key.endswith(_OPTIONAL):
                missing.append(src.key if src else key)
            continue
        got = src.shape(tensors[src.key].shape)
        if got != shape:
            mismatched.append(f"{src.key}: file has {list(tensors[src.key].shape)}, expected {list(shape)}")
    used = {src.key for src in plan.values()}
    unexpected = sorted(k for k in tensors if k not in used and not ignore(k))
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"the {what} weights do not fit the {what} of this model",
            path=str(tensors.where),
            variant=variant,
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    consumers: dict[str, list[tuple[str, Source]]] = {}  # source key -> the module keys it fills
    for key, src in plan.items():
        if key in expected and src.key in tensors:
            consumers.setdefault(src.key, []).append((key, src))
    device = torch.device(device)
    state = {}
    for source_key, raw in tensors.read(sorted(consumers)):
        for key, src in consumers[source_key]:
            t = src.apply(raw)
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
            # The raw buffer is the module's tensor when nothing changes; a row block of a fused weight
            # (storage offset != 0) is copied, so that every tensor starts on an aligned address.
            own = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
            if cast == t.dtype and device.type == "cpu" and own:
                state[key] = t
            else:
                state[key] = t.to(device=device, dtype=cast, copy=True, memory_format=torch.contiguous_format)
        del raw, t
    for key in expected.keys() - state.keys():  # optional counters
        state[key] = torch.zeros((), dtype=torch.long, device=device)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)
