"""Our own bounded GGUF header check, run before llama.cpp ever sees a file.

llama.cpp's GGUF parser has a history of memory-safety bugs on hostile headers, so every
count, length, type, shape and offset is checked here against fixed bounds and the real
file size. Only the header bytes are needed (the caller passes the first bytes of the
file and its total size); tensor data is never read.

The model's hyperparameters get cheap semantic checks too: llama.cpp aborts the whole
process (GGML_ASSERT) rather than refusing a file on values such as zero layers, too many
experts or duplicate vocabulary entries. These checks are not a proof that llama.cpp
loads the file; a load in a child process is.
"""

from __future__ import annotations

import codecs
import itertools
import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from appliance.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_HEADER_BYTES = 64 << 20
# The verifier keeps this much of a model for the check, and only on a longer header (rare:
# Gemma 3's 262k-token vocabulary makes 6.5 MiB) keeps up to MAX_HEADER_BYTES in a second
# pass: on a VM, holding 64 MiB of fresh memory costs more than the whole check.
FIRST_TRY_BYTES = 16 << 20
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_STRING_BYTES = 1 << 20
MAX_ARRAY_ITEMS = 1 << 24
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 16
DEFAULT_ALIGNMENT = 32
_U64 = struct.Struct("<Q")
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplying by it is a bijection
_HASH_SHIFT = np.uint64(32)
_BLOCK = 1 << 13  # strings a numpy step takes: 64 KiB temporaries, reused from the heap
# Hyperparameter bounds. The first two are llama.cpp's own limits (LLAMA_MAX_LAYERS and
# LLAMA_MAX_EXPERTS in src/llama-hparams.h), which it enforces by aborting.
MAX_LAYERS = 512
MAX_EXPERTS = 1024
MAX_EMBEDDING = 1 << 20
MAX_CONTEXT = 1 << 24
MAX_HEADS = 1 << 14
MAX_VOCAB = 1 << 20
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
TOKENS_KEY = "tokenizer.ggml.tokens"

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


@dataclass(frozen=True)
class GGUFSummary:
    version: int
    architecture: str
    name: str
    file_type: str
    parameter_count: int
    tensor_count: int
    context_length: int | None
    header_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Array:
    """A metadata array: its contents are not kept, only what the bounds checks need."""

    item_type: GGUFValueType
    count: int


class GGUFHeaderPastHead(GGUFError):
    """The header goes on past the bytes given to check_gguf_head: try again with more."""


class _Cursor:
    def __init__(self, data: bytes | mmap.mmap, complete: bool, partial: bool = False) -> None:
        self.raw, self.data, self.pos = data, memoryview(data), 0
        self.complete, self.partial = complete, partial

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            if self.complete:
                raise GGUFError("GGUF header is truncated")
            if self.partial:
                raise GGUFHeaderPastHead("the GGUF header goes on past the bytes kept")
            raise GGUFError(f"GGUF header is larger than {MAX_HEADER_BYTES} bytes")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("<Q")
        if length > MAX_STRING_BYTES:
            raise GGUFError(f"GGUF string length {length} exceeds {MAX_STRING_BYTES}")
        try:
            return bytes(self.take(length)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError("GGUF string is not valid UTF-8") from exc

    def strings(self, count: int, unique: bool = False) -> None:
        """Step over `count` strings, each bounded and valid UTF-8; with `unique`, also none
        twice as llama.cpp names them (it calls an empty one "[EMPTY_<id>]").

        A vocabulary holds ~262k strings: numpy decides the common case at once
        (_packed_strings_end); what it cannot prove goes through the exact loop, which also
        words every error."""
        if count == 0:
            return
        end = _packed_strings_end(self.raw, self.pos, count, unique)
        self.pos = end if end is not None else self._strings_one_by_one(count, unique)

    def _strings_one_by_one(self, count: int, unique: bool) -> int:
        """One tight loop, then one decode: joined with an ASCII separator, the strings are
        valid UTF-8 exactly when each one is (an ASCII byte never continues or starts a
        multi-byte sequence inside another)."""
        data = self.raw if isinstance(self.raw, bytes) else bytes(self.raw)  # slices to hash
        pos, size, unpack = self.pos, len(data), _U64.unpack_from
        items: list[bytes] = []
        append = items.append
        try:
            for _ in itertools.repeat(None, count):
                (length,) = unpack(data, pos)  # struct.error once pos passes the end
                start = pos + 8
                pos = start + length
                if length > MAX_STRING_BYTES:
                    raise GGUFError(f"GGUF string length {length} exceeds {MAX_STRING_BYTES}")
                append(data[start:pos])  # past the end a slice comes back short: see below
        except struct.error:
            pos = max(pos, size)
        if pos > size or len(items) < count:
            self.pos = size
            self.take(pos - size + 8)  # raises: truncated, or a header over the cap
        try:
            b"\n".join(items).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError("GGUF string is not valid UTF-8") from exc
        if unique:
            _check_unique(items)
        return pos


def _check_unique(tokens: list[bytes]) -> None:
    """llama.cpp aborts on a vocabulary with a token twice (its id maps differ in size)."""
    unique = set(tokens)
    if len(unique) == len(tokens) and b"" not in unique:
        return
    # llama.cpp's name for an empty token is "[EMPTY_<id>]".
    tokens = [t or f"[EMPTY_{i}]".encode() for i, t in enumerate(tokens)]
    seen: set[bytes] = set()
    for token in tokens:
        if token in seen:
            raise GGUFError(f"GGUF vocabulary holds the token {token.decode()[:40]!r} twice")
        seen.add(token)


def _packed_strings_end(data: bytes | mmap.mmap, pos: int, count: int, unique: bool) -> int | None:
    """Where `count` strings from `pos` on end, when numpy can prove them well formed (and,
    with `unique`, distinct and none empty) without a Python step per string; None when it
    cannot, and the exact loop decides. It proves the common case only, every length < 128:

    - A string can start only where the u64 read there is under 128. When the first
      `count` such places each begin exactly where the one before ends, they are the
      strings: by induction from the first, whatever lies between would break the chain.
    - Every byte outside the strings is then ASCII, so the span is valid UTF-8 exactly
      when each string is (see _strings_one_by_one).
    - Uniqueness: see _strings_distinct. A string twice goes to the loop, which names it.

    numpy works a block at a time (_BLOCK): its temporaries for a whole vocabulary are
    megabytes each, and fresh pages cost more than the work (on a VM, hashing Gemma 3's
    vocabulary in one piece touched 33 MiB of them: half of the check's time)."""
    # offsets where a whole u64 can be read, within the span of `count` strings under 128
    places = min(len(data) - pos - 7, count * (8 + 127))
    if places < 8 * count:
        return None
    words = np.ndarray((places,), "<u8", data, pos, (1,))  # the u64 at every offset
    starts = _first_places_under_128(words, count)
    if len(starts) < count or starts[0] != 0:
        return None
    lengths = words[starts].astype(np.int64)
    for first in range(0, count - 1, _BLOCK):
        block = slice(first, min(first + _BLOCK, count - 1))
        if not np.array_equal(
            starts[block] + lengths[block] + 8, starts[first + 1 : block.stop + 1]
        ):
            return None
    end = pos + int(starts[-1] + lengths[-1]) + 8
    if end > len(data) or not _valid_utf8(memoryview(data)[pos:end]):
        return None
    if unique and not (lengths.all() and _strings_distinct(data, pos, words, starts, lengths)):
        return None
    return end


def _first_places_under_128(words: np.ndarray, count: int) -> np.ndarray:
    """The first `count` offsets whose u64 is under 128 (the strings usually take a fraction
    of the bytes given)."""
    found: list[np.ndarray] = []
    total = 0
    for start in range(0, len(words), 8 * _BLOCK):
        places = np.flatnonzero(words[start : start + 8 * _BLOCK] < 128)
        places += start
        found.append(places)
        total += len(places)
        if total >= count:
            break
    return np.concatenate(found)[:count] if found else np.empty(0, np.int64)


def _valid_utf8(span: memoryview) -> bool:
    """Decoded in pieces: one str of a whole vocabulary would be megabytes of fresh memory
    (up to 4 bytes a character)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for start in range(0, len(span), 2 * _BLOCK):
            decoder.decode(span[start : start + 2 * _BLOCK])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _strings_distinct(
    data: bytes | mmap.mmap, pos: int, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> bool:
    """The strings are distinct when their keys are: a hash of each record (its u64 length,
    then its bytes) read as the u64s at its offsets 0, 8 and 16 and the one ending where it
    ends, each moved back inside a short record. The key covers a string of up to 24 bytes;
    longer ones whose keys meet (alike at both ends) are compared whole."""
    digest = np.zeros(len(starts), np.uint64)
    for first in range(0, len(starts), _BLOCK):
        at, length = starts[first : first + _BLOCK], lengths[first : first + _BLOCK]
        block = digest[first : first + _BLOCK]
        for offsets in (0, np.minimum(length, 8), np.minimum(length, 16), length):
            block ^= words[at + offsets]
            block *= _HASH_MULTIPLIER
            block ^= block >> _HASH_SHIFT
    ordered = np.sort(digest)
    clash = ordered[1:] == ordered[:-1]
    if not clash.any():
        return True
    span = memoryview(data)[pos:]
    suspects = np.flatnonzero(np.isin(digest, ordered[1:][clash]))
    strings = [
        bytes(span[start + 8 : start + 8 + length])
        for start, length in zip(starts[suspects].tolist(), lengths[suspects].tolist(), strict=True)
    ]
    return len(set(strings)) == len(strings)


def check_gguf_head(head: bytes | mmap.mmap, file_size: int) -> GGUFSummary:
    """check_gguf_header on a file's first bytes, which may be fewer than its header needs:
    then GGUFHeaderPastHead (FIRST_TRY_BYTES)."""
    partial = len(head) < min(file_size, MAX_HEADER_BYTES)
    return _check_header(head, file_size, partial=partial)


def check_gguf_header(head: bytes, file_size: int) -> GGUFSummary:
    """Validate a GGUF header. `head` is the file's first min(size, MAX_HEADER_BYTES) bytes."""
    return _check_header(head, file_size, partial=False)


def _check_header(head: bytes | mmap.mmap, file_size: int, partial: bool) -> GGUFSummary:
    cursor = _Cursor(head, complete=len(head) >= file_size, partial=partial)
    if bytes(cursor.take(4)) != GGUF_MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    version = cursor.scalar("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cursor.scalar("<Q"), cursor.scalar("<Q")
    if n_tensors > MAX_TENSORS:
        raise GGUFError(f"GGUF tensor count {n_tensors} exceeds {MAX_TENSORS}")
    if n_kv > MAX_KV:
        raise GGUFError(f"GGUF key/value count {n_kv} exceeds {MAX_KV}")
    metadata = _read_metadata(cursor, n_kv)
    tensors = _read_tensor_infos(cursor, n_tensors)
    alignment = _alignment(metadata)
    data_start = -(-cursor.pos // alignment) * alignment
    parameter_count = _check_tensor_layout(tensors, alignment, data_start, file_size)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("GGUF has no general.architecture")
    _check_hyperparameters(metadata, arch)
    context = metadata.get(f"{arch}.context_length")
    return GGUFSummary(
        version=version,
        architecture=arch,
        name=str(metadata.get("general.name", "")),
        file_type=_file_type_name(metadata.get("general.file_type")),
        parameter_count=parameter_count,
        tensor_count=n_tensors,
        context_length=context if isinstance(context, int) else None,
        header_bytes=data_start,
    )


def _read_metadata(cursor: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        if key in metadata:
            raise GGUFError(f"duplicate GGUF key {key!r}")
        vtype = _value_type(cursor.scalar("<I"))
        if vtype == GGUFValueType.ARRAY:
            metadata[key] = _read_array(cursor, unique_strings=key == TOKENS_KEY)
        elif vtype == GGUFValueType.STRING:
            metadata[key] = cursor.string()
        else:
            metadata[key] = cursor.scalar(_SCALARS[vtype])
    return metadata


def _read_array(cursor: _Cursor, unique_strings: bool) -> _Array:
    item_type = _value_type(cursor.scalar("<I"))
    count = cursor.scalar("<Q")
    if count > MAX_ARRAY_ITEMS:
        raise GGUFError(f"GGUF array length {count} exceeds {MAX_ARRAY_ITEMS}")
    if item_type == GGUFValueType.ARRAY:
        raise GGUFError("nested GGUF arrays are not accepted")
    if item_type != GGUFValueType.STRING:
        cursor.take(count * struct.calcsize(_SCALARS[item_type]))
    elif unique_strings:
        _check_vocabulary(cursor, count)
    else:
        cursor.strings(count)
    return _Array(item_type, count)


def _check_vocabulary(cursor: _Cursor, count: int) -> None:
    if count > MAX_VOCAB:
        raise GGUFError(f"GGUF vocabulary of {count} tokens exceeds {MAX_VOCAB}")
    cursor.strings(count, unique=True)


def _check_hyperparameters(metadata: dict[str, Any], arch: str) -> None:
    """The values llama.cpp asserts on while loading (it aborts instead of refusing)."""
    layers = _integer(metadata, f"{arch}.block_count", 1, MAX_LAYERS, required=True)
    _integer(metadata, f"{arch}.nextn_predict_layers", 0, layers)
    _integer(metadata, f"{arch}.context_length", 1, MAX_CONTEXT)
    _integer(metadata, f"{arch}.embedding_length", 1, MAX_EMBEDDING)
    _check_heads(metadata, arch)
    _check_experts(metadata, arch)
    scaling = metadata.get(f"{arch}.rope.scaling.type", "linear")
    if scaling not in ROPE_SCALING_TYPES:
        raise GGUFError(f"GGUF rope scaling type {scaling!r} is not one of {ROPE_SCALING_TYPES}")


def _check_heads(metadata: dict[str, Any], arch: str) -> None:
    # 0 attention heads is how recurrent models (mamba, rwkv) say they have none.
    heads = _integer(metadata, f"{arch}.attention.head_count", 0, MAX_HEADS, per_layer=True)
    kv_heads = _integer(metadata, f"{arch}.attention.head_count_kv", 0, MAX_HEADS, per_layer=True)
    if heads is None or kv_heads is None:
        return
    if kv_heads > heads or (heads and (kv_heads == 0 or heads % kv_heads)):
        raise GGUFError(f"GGUF has {kv_heads} key/value heads for {heads} attention heads")


def _check_experts(metadata: dict[str, Any], arch: str) -> None:
    experts = _integer(metadata, f"{arch}.expert_count", 0, MAX_EXPERTS) or 0
    used_key = f"{arch}.expert_used_count"
    used = _integer(metadata, used_key, 0, experts, per_layer=True)
    if experts and (used == 0 or used_key not in metadata):
        raise GGUFError(f"GGUF has {experts} experts but {used_key} uses none of them")
    groups = _integer(metadata, f"{arch}.expert_group_count", 0, max(0, experts - 1)) or 0
    if groups > 1:
        _integer(metadata, f"{arch}.expert_group_used_count", 1, groups - 1, required=True)
        if experts % groups:
            raise GGUFError(f"GGUF {experts} experts do not split into {groups} groups")


def _integer(
    metadata: dict[str, Any],
    key: str,
    low: int,
    high: int,
    *,
    required: bool = False,
    per_layer: bool = False,
) -> int | None:
    """A scalar integer metadata value within [low, high], or None where it is absent (or,
    for per-layer values, an array: llama.cpp checks an array's length itself)."""
    value = metadata.get(key)
    if value is None and not required:
        return None
    if per_layer and isinstance(value, _Array):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        shown = "an array" if isinstance(value, _Array) else repr(value)
        raise GGUFError(f"GGUF {key!r} is {shown}; it must be an integer from {low} to {high}")
    return value


def _value_type(raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError as exc:
        raise GGUFError(f"invalid GGUF value type {raw}") from exc


def _read_tensor_infos(cursor: _Cursor, n_tensors: int) -> list[tuple[str, list[int], int, int]]:
    tensors, names = [], set()
    for _ in range(n_tensors):
        name = cursor.string()
        if name in names:
            raise GGUFError(f"duplicate GGUF tensor {name!r}")
        names.add(name)
        n_dims = cursor.scalar("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
        shape = [cursor.scalar("<Q") for _ in range(n_dims)]
        raw_type = cursor.scalar("<I")
        offset = cursor.scalar("<Q")
        tensors.append((name, shape, raw_type, offset))
    return tensors


def _alignment(metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or alignment < 1
        or alignment > MAX_ALIGNMENT
        or alignment & (alignment - 1)
    ):
        raise GGUFError(f"GGUF alignment {alignment!r} is not a power of two <= {MAX_ALIGNMENT}")
    return alignment


def _check_tensor_layout(
    tensors: list[tuple[str, list[int], int, int]], alignment: int, data_start: int, file_size: int
) -> int:
    if data_start > file_size:
        raise GGUFError("GGUF tensor data starts beyond the end of the file")
    data_size = file_size - data_start
    spans, parameters = [], 0
    for name, shape, raw_type, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError) as exc:
            raise GGUFError(f"tensor {name!r} has invalid type {raw_type}") from exc
        elements = 1
        for dim in shape:
            if dim < 1 or dim > 1 << 40:
                raise GGUFError(f"tensor {name!r} has invalid dimension {dim}")
            elements *= dim
        if shape[0] % block:
            raise GGUFError(f"tensor {name!r}: row size {shape[0]} is not a multiple of {block}")
        if offset % alignment:
            raise GGUFError(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        nbytes = elements // block * type_size
        if offset + nbytes > data_size:
            raise GGUFError(f"tensor {name!r} data extends beyond the end of the file")
        spans.append((offset, offset + nbytes, name))
        parameters += elements
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise GGUFError(f"tensors {first!r} and {second!r} overlap")
    return parameters


def _file_type_name(raw: object) -> str:
    if not isinstance(raw, int):
        return "unknown"
    try:
        return LlamaFileType(raw).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"unknown({raw})"
