"""The one module that imports llama_cpp: a loaded model, one context shared by all slots,
batched decoding, per-sequence samplers, tokenization, and llama.cpp's quantizer.

Everything above this module (scheduler, API) is plain Python over these few calls.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from appliance.errors import ApplianceError, EngineError
from appliance.serve.config import SamplingParams

DEFAULT_SEED = llama_cpp.LLAMA_DEFAULT_SEED
_LSTRIP, _RSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP, llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
_ASCII_SPACE = " \t\n\r\v\f"  # what llama.cpp's isspace() strips around such tokens


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    slots: int  # sequences decoded together; each has its own KV stream
    context_per_slot: int = 2048
    batch_tokens: int = 512  # tokens per decode step: one per generating slot + prefill
    threads: int = 0  # 0: one per core
    gpu_layers: int = 0


@dataclass(frozen=True)
class BatchItem:
    token: int
    position: int
    sequence: int
    wants_logits: bool


# ggml's log levels (ggml.h); 5 continues the previous line and is dropped with it.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", "replace").rstrip()
    logging.getLogger("appliance.llama").log(_GGML_LEVELS.get(level, logging.DEBUG), "%s", message)


def _quiet_llama_logs() -> None:
    """llama.cpp's log through our logger, errors only unless configured otherwise.

    llama-cpp-python's own callback maps ggml's levels one off: warnings print as errors
    (every Gemma load printed "control-looking token ... probably a bug in the model", a
    harmless note on how the vocabulary marks `</s>`) and real errors are hidden."""
    llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
    logger = logging.getLogger("appliance.llama")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


class Sampler:
    """One sequence's llama.cpp sampler chain (per-request temperature, top-k, seed...).

    Temperature 0 is greedy decoding: an argmax over the logits, done with numpy in place
    (llama.cpp's greedy sampler first copies all ~262k candidates, about 1 ms a token).
    """

    def __init__(self, params: SamplingParams) -> None:
        self._chain = None
        if params.temperature <= 0:
            return
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        seed = DEFAULT_SEED if params.seed < 0 else params.seed & 0xFFFFFFFF
        stages = [
            llama_cpp.llama_sampler_init_top_k(params.top_k),
            llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(params.min_p, 1),
            llama_cpp.llama_sampler_init_temp(params.temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ]
        for stage in stages:
            llama_cpp.llama_sampler_chain_add(chain, stage)  # the chain owns its stages
        self._chain = chain

    def sample(self, engine: Engine, batch_index: int) -> int:
        if self._chain is None:
            return engine.argmax(batch_index)
        return llama_cpp.llama_sampler_sample(self._chain, engine._ctx, batch_index)

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class Engine:
    """A model loaded once, and a context with one KV stream per slot."""

    def __init__(self, config: EngineConfig) -> None:
        _quiet_llama_logs()
        llama_cpp.llama_backend_init()
        self.config = config
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = config.gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(
            str(config.model_path).encode(), model_params
        )
        if not self._model:
            raise EngineError(f"llama.cpp could not load {config.model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        threads = config.threads or os.cpu_count() or 1
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.slots * config.context_per_slot
        params.n_batch = params.n_ubatch = config.batch_tokens
        params.n_seq_max = config.slots
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # a KV stream per slot (see the scheduler's slot order)
        # A sliding-window model keeps only its window in the windowed layers' cache, as
        # llama-server does (full-size: 1.7x the KV memory for Gemma 3). A slot's prefix
        # then survives only within the window; past it, forget_sequence() says it cannot
        # cut there and the scheduler prefills the prompt again.
        params.swa_full = False
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError("llama.cpp could not create a context")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._window = llama_cpp.llama_model_n_swa(self._model)  # 0: no sliding window
        self.context_per_slot = llama_cpp.llama_n_ctx_seq(self._ctx)
        self._batch = llama_cpp.llama_batch_init(config.batch_tokens, 0, 1)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._piece = ctypes.create_string_buffer(256)
        self._index_control_tokens()

    # -- text ------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Tokenize text as text: a literal "<end_of_turn>" in it never becomes a control
        token (user-defined tokens, which are plain text to the model, still apply)."""
        data = text.encode()
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), tokens, capacity, add_special, False
        )
        if count < 0:  # the buffer was too small: -count tokens are needed
            capacity = -count
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), tokens, capacity, add_special, False
            )
        return list(tokens[:count])

    def tokenize_template(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        """Tokenize a rendered chat prompt given as (text, is_markup) pieces: control tokens
        come only from the template's markup; message content is always text.

        For benign content this gives exactly what llama.cpp's own special-token parsing of
        the whole prompt gives: it too splits the text at control tokens and tokenizes each
        run of text between them on its own (adding a SentencePiece space prefix there).
        """
        fragments: list[int | str] = []  # control token ids and runs of text
        for text, is_markup in pieces:
            for part in self._split_controls(text) if is_markup else [text]:
                if isinstance(part, str) and fragments and isinstance(fragments[-1], str):
                    fragments[-1] += part
                elif part != "":
                    fragments.append(part)
        tokens: list[int] = []
        for index, fragment in enumerate(fragments):
            if isinstance(fragment, int):
                tokens.append(fragment)
                continue
            if index > 0 and self._strips(fragments[index - 1], _RSTRIP):
                fragment = fragment.lstrip(_ASCII_SPACE)
            if index + 1 < len(fragments) and self._strips(fragments[index + 1], _LSTRIP):
                fragment = fragment.rstrip(_ASCII_SPACE)
            tokens.extend(self.tokenize(fragment, add_special=False))
        bos, eos = llama_cpp.llama_vocab_bos(self._vocab), llama_cpp.llama_vocab_eos(self._vocab)
        if llama_cpp.llama_vocab_get_add_bos(self._vocab) and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        if llama_cpp.llama_vocab_get_add_eos(self._vocab):
            tokens.append(eos)
        return tokens

    def _split_controls(self, text: str) -> list[int | str]:
        if self._controls is None:
            return [text]
        split = self._controls.split(text)  # text, control, text, control, ..., text
        return [self._control_ids[p] if i % 2 else p for i, p in enumerate(split)]

    def _strips(self, fragment: int | str, flag: int) -> bool:
        return isinstance(fragment, int) and bool(
            llama_cpp.llama_vocab_get_attr(self._vocab, fragment) & flag
        )

    def _index_control_tokens(self) -> None:
        """The control (and unknown) tokens' texts, longest first, as llama.cpp matches them."""
        wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        self._control_ids: dict[str, int] = {}
        for token in range(self._n_vocab):
            if llama_cpp.llama_vocab_get_attr(self._vocab, token) & wanted:
                text = (llama_cpp.llama_vocab_get_text(self._vocab, token) or b"").decode(
                    errors="replace"
                )
                if text:
                    self._control_ids.setdefault(text, token)
        longest_first = sorted(self._control_ids, key=len, reverse=True)
        self._controls = (
            re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
            if longest_first
            else None
        )

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens render as nothing)."""
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, 256, 0, False)
        return self._piece.raw[:n] if n > 0 else b""

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self._model, None)
        return template.decode() if template else None

    def apply_builtin_template(self, name: str, messages: list[tuple[str, str]]) -> str:
        """Render messages with one of llama.cpp's built-in templates ("gemma", "chatml")."""
        chat = (llama_cpp.llama_chat_message * len(messages))()
        keep = [(role.encode(), content.encode()) for role, content in messages]
        for i, (role, content) in enumerate(keep):
            chat[i].role, chat[i].content = role, content
        size = 256 + sum(len(r) + len(c) for r, c in keep) * 2
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(keep), True, buffer, size)
        if n > size:
            buffer = ctypes.create_string_buffer(n)
            n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(keep), True, buffer, n)
        if n < 0:
            raise EngineError(f"llama.cpp has no built-in chat template {name!r}")
        return buffer.raw[:n].decode(errors="replace")

    @property
    def architecture(self) -> str:
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_model_meta_val_str(self._model, b"general.architecture", buffer, 64)
        return buffer.value.decode() if n > 0 else ""

    def special_token_text(self, which: str) -> str:
        token = {"bos": llama_cpp.llama_vocab_bos, "eos": llama_cpp.llama_vocab_eos}[which](
            self._vocab
        )
        if token < 0:
            return ""
        text = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode(errors="replace") if text else ""

    # -- decoding --------------------------------------------------------------------

    def decode(self, items: list[BatchItem]) -> None:
        """Decode one batch; sequences ask for logits at the items that sample next."""
        batch = self._batch
        for i, item in enumerate(items):
            batch.token[i] = item.token
            batch.pos[i] = item.position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = item.sequence
            batch.logits[i] = item.wants_logits
        batch.n_tokens = len(items)
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")

    def argmax(self, batch_index: int) -> int:
        logits = llama_cpp.llama_get_logits_ith(self._ctx, batch_index)
        return int(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)).argmax())

    def logprob(self, batch_index: int, token: int) -> float:
        """log P(token) under the logits at `batch_index` (a log-softmax over the vocabulary,
        about a millisecond for Gemma's 262k tokens: computed only for a confidence rule)."""
        logits = llama_cpp.llama_get_logits_ith(self._ctx, batch_index)
        values = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        peak = values.max()
        return float(values[token] - peak - np.log(np.exp(values - peak).sum()))

    def copy_sequence(self, source: int, target: int) -> None:
        """Make `target` hold everything `source` holds (all its positions; cut the copy
        with forget_sequence). Across KV streams llama.cpp copies the whole stream's
        buffer, at the start of the next decode."""
        llama_cpp.llama_memory_seq_rm(self._memory, target, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def forget_sequence(self, sequence: int, from_position: int = 0) -> bool:
        """Free a sequence's KV cells from a position on (all of them by default).

        False when the cells before that position cannot be kept: llama.cpp refuses the cut,
        or a sliding-window cache has already overwritten part of the window that the next
        position attends to (llama.cpp does not check that itself). The caller then clears
        the whole sequence and prefills again."""
        if from_position <= 0:
            return bool(llama_cpp.llama_memory_seq_rm(self._memory, sequence, -1, -1))
        oldest = llama_cpp.llama_memory_seq_pos_min(self._memory, sequence)
        if self._window and oldest > max(0, from_position - self._window - 1):
            return False
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, sequence, from_position, -1))

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = self._model = None


def quantize_gguf(source: Path, target: Path, quant_type: str) -> None:
    """Quantize an F32/F16/BF16 GGUF to `quant_type` (e.g. "Q4_K_M") with llama.cpp."""
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant_type}", None)
    if ftype is None:
        raise ApplianceError(f"llama.cpp does not know the quantization type {quant_type}")
    _quiet_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0 or not target.is_file():
        raise ApplianceError(f"llama.cpp failed to quantize {source.name} to {quant_type}")
