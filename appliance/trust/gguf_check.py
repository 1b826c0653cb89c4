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

import itertools
import struct
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from appliance.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_HEADER_BYTES = 64 << 20
FIRST_TRY_BYTES = 8 << 20
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_STRING_BYTES = 1 << 20
MAX_ARRAY_ITEMS = 1 << 24
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 16
DEFAULT_ALIGNMENT = 32
_U64 = struct.Struct("<Q")
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


class _NeedMore(GGUFError):
    """The header goes on past the first bytes given (check_gguf_chunks then tries all)."""


class _Cursor:
    def __init__(self, data: bytes, complete: bool, partial: bool = False) -> None:
        self.raw, self.data, self.pos = data, memoryview(data), 0
        self.complete, self.partial = complete, partial

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            if self.complete:
                raise GGUFError("GGUF header is truncated")
            if self.partial:
                raise _NeedMore("more of the file is needed")
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

    def strings(self, count: int) -> list[bytes]:
        """`count` strings, as bytes, each bounded and all of them valid UTF-8.

        A vocabulary holds ~262k of them, so this is one tight loop and one decode: joined
        with an ASCII separator, the strings are valid UTF-8 exactly when each one is
        (an ASCII byte never continues or starts a multi-byte sequence inside another)."""
        data, pos, size, unpack = self.raw, self.pos, len(self.raw), _U64.unpack_from
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
        self.pos = pos
        try:
            b"\n".join(items).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError("GGUF string is not valid UTF-8") from exc
        return items


def check_gguf_chunks(chunks: list[bytes], file_size: int) -> GGUFSummary:
    """check_gguf_header on the file's first min(size, MAX_HEADER_BYTES) bytes, given as
    chunks: it first tries the first FIRST_TRY_BYTES of them, since joining all 64 MiB
    costs ~30 ms and most headers are a few MiB (Gemma 3's 262k-token vocabulary: 6.5)."""
    first, first_bytes = 0, 0
    while first < len(chunks) and first_bytes < FIRST_TRY_BYTES:
        first_bytes += len(chunks[first])
        first += 1
    if first < len(chunks):
        try:
            return _check_header(b"".join(chunks[:first]), file_size, partial=True)
        except _NeedMore:
            pass
    return check_gguf_header(b"".join(chunks), file_size)


def check_gguf_header(head: bytes, file_size: int) -> GGUFSummary:
    """Validate a GGUF header. `head` is the file's first min(size, MAX_HEADER_BYTES) bytes."""
    return _check_header(head, file_size, partial=False)


def _check_header(head: bytes, file_size: int, partial: bool) -> GGUFSummary:
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
    """llama.cpp aborts on a vocabulary with a token twice (its id maps differ in size)."""
    if count > MAX_VOCAB:
        raise GGUFError(f"GGUF vocabulary of {count} tokens exceeds {MAX_VOCAB}")
    # llama.cpp's name for an empty token is "[EMPTY_<id>]".
    tokens = cursor.strings(count)
    unique = set(tokens)
    if len(unique) == len(tokens) and b"" not in unique:
        return
    tokens = [t or f"[EMPTY_{i}]".encode() for i, t in enumerate(tokens)]
    seen: set[bytes] = set()
    for token in tokens:
        if token in seen:
            raise GGUFError(f"GGUF vocabulary holds the token {token.decode()[:40]!r} twice")
        seen.add(token)


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
