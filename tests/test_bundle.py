"""Build then verify real bundles, and check them with the independent verifier."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import DEMO_BUNDLE, REPO, write_bundle_dir

from appliance.trust.gguf_check import check_gguf_header

SIGNED_FILES = {
    "cards/data-card.md",
    "cards/model-card.md",
    "eval/golden/arithmetic.jsonl",
    "eval/golden/facts.jsonl",
    "eval/golden/formats.jsonl",
    "eval/golden/redteam.jsonl",
    "eval/golden/retrieval.jsonl",
    "eval/golden/grounded.jsonl",
    "eval/golden/safety.jsonl",
    "eval/spec.toml",
    "model.gguf",
    "policy.toml",
    "serving.json",
    *(f"corpus/{doc.name}" for doc in (DEMO_BUNDLE / "corpus").iterdir()),
}


def model_signing_verify(signature: Path, public_key: Path, model_dir: Path):
    """Run the independent OpenSSF verifier's own CLI, as security staff would."""
    cli = shutil.which("model_signing", path=str(Path(__file__).parents[1] / ".venv/bin"))
    assert cli, "model_signing CLI missing (test extra not installed)"
    return subprocess.run(
        [
            cli,
            "verify",
            "key",
            "--signature",
            str(signature),
            "--public_key",
            str(public_key),
            str(model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def build_and_unpack(run_cli, toml: Path, key, tmp_path: Path) -> tuple[dict, Path]:
    """Build with one key, then verify and unpack; return the JSON report and the files."""
    built = run_cli("bundle", "build", toml, "--key", key.private, "--out", tmp_path / "o")
    assert built.exit_code == 0, built.output
    unpacked = tmp_path / "files"
    result = run_cli(
        "bundle", "unpack", tmp_path / "o" / "demo-1.0.0.tar", "--out", unpacked, "--json"
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output), unpacked


def test_build_then_verify_tiny(run_cli, tiny_bundle_toml, trusted_key, tmp_path, tiny_gguf):
    built = run_cli(
        "bundle",
        "build",
        tiny_bundle_toml,
        "--key",
        trusted_key.private,
        "--out",
        tmp_path / "out",
        "--json",
    )
    assert built.exit_code == 0, built.output
    bundle = Path(json.loads(built.output)["bundle"])

    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert names[0] == "signatures/00.sig", "the signature entry must come first"
    assert set(names[1:]) == SIGNED_FILES

    result = run_cli("bundle", "verify", bundle, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["verdict"] == "verified"
    assert report["signers"] == [trusted_key.key_id]
    assert report["release"]["name"] == "demo" and report["release"]["sequence"] == 1
    assert report["release"]["quant_type"] == "F32"
    assert report["gguf"]["architecture"] == "llama"
    assert report["gguf"]["context_length"] == 256
    assert report["files"]["model.gguf"]["size"] == tiny_gguf.stat().st_size

    text = run_cli("bundle", "verify", bundle)
    assert "VERIFIED" in text.output and trusted_key.key_id in text.output


def test_independent_verifier_accepts_each_signature(run_cli, tiny_bundle_toml, make_key, tmp_path):
    first, second = make_key("first"), make_key("second")
    first.trust()
    second.trust()
    built = run_cli(
        "bundle",
        "build",
        tiny_bundle_toml,
        "--key",
        first.private,
        "--key",
        second.private,
        "--out",
        tmp_path / "out",
    )
    assert built.exit_code == 0, built.output
    unpacked = tmp_path / "files"
    result = run_cli("bundle", "unpack", tmp_path / "out" / "demo-1.0.0.tar", "--out", unpacked)
    assert result.exit_code == 0, result.output

    for index, key in enumerate((first, second)):
        verdict = model_signing_verify(
            unpacked / f"signatures/{index:02d}.sig", key.public, unpacked
        )
        assert verdict.returncode == 0, verdict.stderr
        assert "Verification succeeded" in verdict.stdout

    # The independent verifier notices tampering too, so the format is really checked.
    (unpacked / "cards" / "model-card.md").write_text("tampered")
    verdict = model_signing_verify(unpacked / "signatures/00.sig", first.public, unpacked)
    assert verdict.returncode != 0


def test_several_keys_meet_a_threshold(run_cli, tiny_bundle_toml, make_key, tmp_path):
    keys = [make_key(f"k{i}") for i in range(3)]
    for key in keys:
        key.trust()
    assert run_cli("keys", "threshold", "3").exit_code == 0
    args = [arg for key in keys for arg in ("--key", key.private)]
    assert run_cli("bundle", "build", tiny_bundle_toml, *args, "--out", tmp_path).exit_code == 0
    result = run_cli("bundle", "verify", tmp_path / "demo-1.0.0.tar", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.output)["signers"]) == sorted(k.key_id for k in keys)


def test_build_quantizes_and_records_provenance(run_cli, tmp_path, tiny_gguf, trusted_key):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf, quantize="Q8_0")
    report, unpacked = build_and_unpack(run_cli, toml, trusted_key, tmp_path)

    source_sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert report["release"]["quant_type"] == "Q8_0"
    assert report["release"]["source_model_sha256"] == source_sha
    assert report["gguf"]["file_type"] == "Q8_0"
    model = (unpacked / "model.gguf").read_bytes()
    assert len(model) < tiny_gguf.stat().st_size / 2
    card = (unpacked / "cards" / "model-card.md").read_text()
    assert source_sha in card and "Q8_0" in card


def test_quantize_refuses_an_already_quantized_model(run_cli, tmp_path, tiny_gguf, trusted_key):
    from appliance.serve.engine import quantize_gguf

    q8 = tmp_path / "q8.gguf"
    quantize_gguf(tiny_gguf, q8, "Q8_0")
    toml = write_bundle_dir(tmp_path / "src", q8, quantize="Q4_K_M")
    result = run_cli("bundle", "build", toml, "--key", trusted_key.private, "--out", tmp_path)
    assert result.exit_code == 3
    assert "F32/F16/BF16" in result.output


def test_bad_bundle_toml_is_a_clear_usage_error(run_cli, tmp_path, trusted_key, tiny_gguf):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    toml.write_text(toml.read_text().replace("sequence = 1 ", "sequence = 0 "))
    result = run_cli("bundle", "build", toml, "--key", trusted_key.private, "--out", tmp_path)
    assert result.exit_code == 3
    assert "sequence" in result.output


@pytest.mark.parametrize(
    ("attack", "old", "new", "reason"),
    [
        ("sequence_beyond_int64", "sequence = 1 ", f"sequence = {1 << 63} ", "release.sequence"),
        ("name_with_newline", 'name = "demo"', 'name = "demo\\n"', "release name"),
        ("name_with_control_character", 'name = "demo"', 'name = "demo\\u001b"', "release name"),
        ("version_with_newline", 'version = "1.0.0"', 'version = "1.0.0\\n"', "version"),
        (
            "version_with_control_character",
            'version = "1.0.0"',
            'version = "1.0\\u0000"',
            "version",
        ),
    ],
)
def test_bundle_toml_refuses_hostile_release_fields(
    run_cli, tmp_path, trusted_key, tiny_gguf, attack, old, new, reason
):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    assert old in toml.read_text()
    toml.write_text(toml.read_text().replace(old, new, 1))
    result = run_cli("bundle", "build", toml, "--key", trusted_key.private, "--out", tmp_path)
    assert result.exit_code == 3, attack
    assert reason in result.output


def test_bundle_toml_refuses_golden_set_name_with_newline(
    run_cli, tmp_path, trusted_key, tiny_gguf
):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    golden = tmp_path / "src" / "eval" / "golden"
    (golden / "facts.jsonl").rename(golden / "facts.jsonl\n")
    toml.write_text(toml.read_text().replace('golden/facts.jsonl"', 'golden/facts.jsonl\\n"'))
    result = run_cli("bundle", "build", toml, "--key", trusted_key.private, "--out", tmp_path)
    assert result.exit_code == 3
    assert "golden set file name" in result.output


def test_unpack_leaves_nothing_when_verification_fails(run_cli, tiny_bundle, tmp_path):
    data = bytearray(tiny_bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data)
    result = run_cli("bundle", "unpack", bad, "--out", tmp_path / "files")
    assert result.exit_code == 13
    assert not (tmp_path / "files").exists()
    assert not list(tmp_path.glob(".files*"))


def test_tiny_model_loads_and_generates_in_llama_cpp(tiny_gguf):
    import llama_cpp

    llm = llama_cpp.Llama(str(tiny_gguf), n_ctx=128, verbose=False, seed=7)
    first = llm("the model", max_tokens=8, temperature=0.0)
    second = llm("the model", max_tokens=8, temperature=0.0)
    assert first["usage"]["completion_tokens"] > 0
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    size = tiny_gguf.stat().st_size
    assert size < 1_000_000
    assert check_gguf_header(tiny_gguf.read_bytes(), size).architecture == "llama"


@pytest.mark.real_model
def test_gemma_bundle_builds_verifies_and_passes_model_signing(
    run_cli, tmp_path, gemma_gguf, trusted_key
):
    toml = write_bundle_dir(tmp_path / "src", gemma_gguf)
    report, unpacked = build_and_unpack(run_cli, toml, trusted_key, tmp_path)
    gguf = report["gguf"]
    assert gguf["architecture"] == "gemma3"
    assert gguf["file_type"] == "Q4_K_M"
    assert 250e6 < gguf["parameter_count"] < 300e6
    assert gguf["context_length"] == 32768
    verdict = model_signing_verify(unpacked / "signatures/00.sig", trusted_key.public, unpacked)
    assert verdict.returncode == 0, verdict.stderr


@pytest.mark.real_model
def test_demo_command_runs_the_main_job(run_cli, gemma_gguf, appliance_home):
    cache = appliance_home / "cache" / "models"
    cache.mkdir(parents=True)
    shutil.copy(gemma_gguf, cache / gemma_gguf.name)  # as if assembled by an earlier run
    result = run_cli("demo", REPO / "bundles" / "demo" / "bundle.toml")
    assert result.exit_code == 0, result.output
    assert "VERIFIED" in result.output
    assert (appliance_home / "var" / "bundles" / "demo-1.0.0.tar").is_file()
    listing = json.loads(run_cli("release", "list", "--json").output)
    assert [(r["ref"], r["state"]) for r in listing["releases"]] == [("demo@1.0.0", "active")]
    again = run_cli("demo", REPO / "bundles" / "demo" / "bundle.toml")
    assert again.exit_code == 0 and "already active" in again.output


def test_host_failure_is_one_line_with_its_own_code(
    run_cli, tiny_bundle_toml, trusted_key, tmp_path
):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = run_cli(
        "bundle", "build", tiny_bundle_toml, "--key", trusted_key.private, "--out", blocker / "out"
    )
    assert result.exit_code == 5
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")


def test_openssl_and_sha256sum_verify_a_bundle(run_cli, tiny_bundle, trusted_key, tmp_path):
    """The third way: standard tools only (scripts/openssl-verify-bundle)."""
    files = tmp_path / "files"
    assert run_cli("bundle", "unpack", tiny_bundle, "--out", files).exit_code == 0
    script = [str(REPO / "scripts/openssl-verify-bundle"), str(files), str(trusted_key.public)]
    done = subprocess.run(script, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Verified OK" in done.stdout and f"{len(SIGNED_FILES)} files match" in done.stdout

    (files / "serving.json").chmod(0o644)
    (files / "serving.json").write_text('{"threads": 64}')
    tampered = subprocess.run(script, capture_output=True, text=True)
    assert tampered.returncode != 0 and "serving.json" in tampered.stdout + tampered.stderr


@pytest.mark.real_model
def test_demo_ends_serving_on_loopback(gemma_gguf, appliance_home):
    """The README's main command: everything, then the service answering on 127.0.0.1."""
    import os

    import httpx
    from serving import free_port, wait_for

    cache = appliance_home / "cache" / "models"
    cache.mkdir(parents=True)
    shutil.copy(gemma_gguf, cache / gemma_gguf.name)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "appliance",
        "demo",
        str(REPO / "bundles/demo/bundle.toml"),
        "--serve",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        command, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, seconds=120)
        key = (appliance_home / "etc/demo-keys/api-key").read_text().strip()
        response = httpx.post(
            url + "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"prompt": "Monday, Tuesday,", "max_tokens": 6},
            timeout=60,
        )
        assert response.status_code == 200 and response.json()["model"] == "demo@1.0.0"
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "curl -s http://127.0.0.1" in output and "from openai import OpenAI" in output
