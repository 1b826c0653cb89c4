"""A tiny deterministic llama-architecture GGUF that llama.cpp loads and generates from.

Two transformer blocks of width 64 over a 300-token SentencePiece-style vocabulary
(control tokens, the 256 byte tokens and a few words), random weights from a fixed
seed: about 0.6 MB in F32, so tests can build, sign and serve real models quickly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

N_EMBD, N_HEAD, N_LAYER, N_FF, N_CTX = 64, 4, 2, 128, 256
WORDS = [
    "▁the",
    "▁a",
    "▁is",
    "▁of",
    "▁and",
    "▁to",
    "▁in",
    "▁model",
    "▁signed",
    "▁bundle",
    "▁hello",
    "▁world",
    "▁one",
    "▁two",
    "▁three",
    "▁yes",
    "▁no",
    "▁Paris",
    "▁capital",
    "▁France",
    "▁.",
    "▁,",
    "▁!",
    "▁?",
    "▁I",
    "▁you",
    "▁we",
    "▁it",
    "▁data",
    "▁test",
    "▁run",
    "▁fast",
    "▁slow",
    "▁good",
    "▁bad",
    "▁new",
    "▁old",
    "▁time",
    "▁day",
    "▁year",
    "▁small",
    "▁large",
    "▁true",
    "▁false",
]


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + WORDS
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(WORDS)
    scores = [0.0] * 259 + [-float(i) for i in range(len(WORDS))]
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(
    path: Path,
    seed: int = 0,
    dtype: type = np.float32,
    alignment: int | None = None,
    aborts_llama_cpp: bool = False,
) -> Path:
    """Write the tiny model to path; the same arguments always give the same bytes.

    `aborts_llama_cpp` stores one norm weight as Q8_0: a well-formed file that passes our
    header check, and on which llama.cpp's first decode aborts the process ("binary_op:
    unsupported types"), as a hostile or broken release could."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-llama-{seed}")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(LlamaFileType.ALL_F32 if dtype == np.float32 else LlamaFileType.MOSTLY_F16)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    vocab = len(tokens)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(dtype)

    writer.add_tensor("token_embd.weight", weight(vocab, N_EMBD))
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        norm = np.ones(N_EMBD, dtype=np.float32)
        if aborts_llama_cpp and layer == 0:
            q8 = GGMLQuantizationType.Q8_0
            writer.add_tensor(f"{prefix}.attn_norm.weight", quantize(norm, q8), raw_dtype=q8)
        else:
            writer.add_tensor(f"{prefix}.attn_norm.weight", norm)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weight(vocab, N_EMBD))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
