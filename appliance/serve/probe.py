"""The load probe: a model is loaded once in a child process before any long-lived process
(the service, an eval, an install) loads it.

Our GGUF header check bounds what llama.cpp's parser sees, but llama.cpp may still abort()
(a GGML_ASSERT on a hyperparameter) on a file the check passes, and an abort takes the
whole process with it. The child loads the model, creates a context like the service's,
and decodes one token; if it dies, times out or fails, the model is refused with the last
line llama.cpp printed, and the caller's process never touches it.

Run as `python -m appliance.serve.probe MODEL.gguf CONTEXT THREADS GPU_LAYERS`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from appliance.errors import ModelLoadError
from appliance.serve.config import ServingConfig

PROBE_TIMEOUT_SECONDS = 600.0


def probe_model(
    model: Path, context_size: int = 512, threads: int = 0, gpu_layers: int = 0
) -> None:
    """Load `model` in a child process; raise ModelLoadError if that child does not succeed."""
    command = [
        sys.executable,
        "-m",
        "appliance.serve.probe",
        str(model),
        str(context_size),
        str(threads),
        str(gpu_layers),
    ]
    # No gdb backtrace on abort (slow, and ptrace is denied under systemd anyway).
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelLoadError(
            f"{model.name} failed the load probe: llama.cpp did not load it within "
            f"{PROBE_TIMEOUT_SECONDS:.0f} s"
        ) from exc
    if done.returncode != 0:
        raise ModelLoadError(
            f"{model.name} failed the load probe: {_how(done.returncode)}"
            f"{': ' + _last_line(done.stderr) if _last_line(done.stderr) else ''}"
        )


def probe_release(release_dir: Path) -> None:
    """Probe a (staged or installed) release's model with its own serving config."""
    serving = ServingConfig.from_release_dir(release_dir)
    probe_model(
        release_dir / "model.gguf", serving.context_size, serving.threads, serving.gpu_layers
    )


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"llama.cpp was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"llama.cpp was killed by signal {-returncode}"
    return f"the probe exited with status {returncode}"


def _last_line(stderr: str) -> str:
    """The most telling line llama.cpp printed: an assertion, else an error, else the last."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("GGML_ASSERT", "error", "Error"):
        found = [line for line in lines if marker in line]
        if found:
            return found[-1][-300:]
    return lines[-1][-300:] if lines else ""


def _child(model: Path, context_size: int, threads: int, gpu_layers: int) -> None:
    from appliance.serve.engine import BatchItem, Engine, EngineConfig

    engine = Engine(
        EngineConfig(
            model_path=model,
            slots=1,
            context_per_slot=context_size,
            threads=threads,
            gpu_layers=gpu_layers,
        )
    )
    tokens = engine.tokenize("probe") or [0]
    last = len(tokens) - 1
    engine.decode([BatchItem(t, i, 0, i == last) for i, t in enumerate(tokens)])
    engine.argmax(last)
    engine.close()


if __name__ == "__main__":
    path, context, n_threads, layers = sys.argv[1:5]
    try:
        _child(Path(path), int(context), int(n_threads), int(layers))
    except Exception as exc:  # a clean refusal by llama.cpp: say why on the last line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
