"""The routing policy: signed in the release, overridden by an admin, judged by rules."""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import json_runner, write_bundle_dir
from test_evals import tiny_release
from test_store import audit_actions

from appliance.bundler.spec import load_bundle_spec
from appliance.errors import UsageError
from appliance.paths import appliance_paths
from appliance.serve.policy import RoutingPolicy

POLICY = RoutingPolicy.from_dict(
    {
        "max_prompt_tokens": 100,
        "categories": {"legal": r"(?i)\bcontract"},
        "client_may_escalate": True,
        "refusal_patterns": [r"(?i)^I can(no|')t help"],
        "min_mean_logprob": -2.0,
    }
)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_prompt_tokens": -1}, "max_prompt_tokens must be an integer"),
        ({"max_prompt_tokens": True}, "max_prompt_tokens must be an integer"),
        ({"categories": {"Legal Stuff": "x"}}, "category name"),
        ({"categories": {"legal": "("}}, "not a valid regular expression"),
        ({"refusal_patterns": "sorry"}, "must be a list"),
        ({"refusal_patterns": [""]}, "non-empty regular expression"),
        ({"min_mean_logprob": 0.5}, "a number <= 0"),
        ({"validate_json": "yes"}, "true or false"),
        ({"escalate_everything": True}, "unknown keys escalate_everything"),
    ],
)
def test_a_policy_that_cannot_be_applied_is_refused(raw, message):
    with pytest.raises(UsageError, match=message):
        RoutingPolicy.from_dict(raw)


def test_before_generation_rules():
    def before(text="hello", tokens=10, context=2048, asks=False):
        return POLICY.before(text, tokens, context, asks)

    assert before() is None
    assert before(tokens=2048) == "context"  # no room left to generate in
    assert before(tokens=101) == "prompt_tokens"
    assert before(text="Review this Contract for me") == "category:legal"
    assert before(asks=True) == "client"
    assert RoutingPolicy().before("hello", 10, 2048, True) is None  # clients may not ask


def test_after_generation_rules():
    assert POLICY.after("Paris.", -0.5, wants_json=False) is None
    assert POLICY.after("I can't help with that.", -0.1, wants_json=False) == "refusal"
    assert POLICY.after("Paris.", -0.5, wants_json=True) == "invalid_json"
    assert POLICY.after('{"city": "Paris"}', -0.5, wants_json=True) is None
    assert POLICY.after("[1, 2]", -0.5, wants_json=True) == "invalid_json"  # an object
    assert POLICY.after("Paris.", -2.5, wants_json=False) == "low_confidence"
    assert POLICY.after("Paris.", None, wants_json=False) is None  # confidence not scored
    lenient = POLICY.with_overrides({"validate_json": False, "min_mean_logprob": None})
    assert lenient.after("Paris.", -9.0, wants_json=True) is None


def test_the_bundle_signs_its_routing_policy(tmp_path, tiny_gguf):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    spec = load_bundle_spec(toml)
    assert spec.routing["categories"]["legal"] and spec.routing["client_may_escalate"] is True
    assert RoutingPolicy.from_dict(spec.routing).max_prompt_tokens == 1536
    toml.write_text(toml.read_text().replace('legal = "', 'legal = "(unclosed'))
    with pytest.raises(UsageError, match=r"\[routing\]: category legal .* not a valid regular"):
        load_bundle_spec(toml)


def test_an_admin_overrides_the_signed_policy_audited(run_cli, tiny_bundle):
    cli = json_runner(run_cli)
    assert cli("release", "install", tiny_bundle)[0] == 0
    assert cli("release", "activate", "demo@1.0.0", "--force", "--reason", "test")[0] == 0
    code, shown = cli("route", "policy")
    assert code == 0 and shown["release"] == "demo@1.0.0" and shown["overrides"] == {}
    assert shown["effective"]["max_prompt_tokens"] == 1536  # the release's own

    assert cli("route", "policy", "set", "min_mean_logprob", "-1.5")[0] == 2  # no reason
    code, error = cli("route", "policy", "set", "min_mean_logprob", "0.5", "--reason", "x")
    assert code == 3 and "a number <= 0" in error["error"]
    code, error = cli("route", "policy", "set", "speed", "1", "--reason", "x")
    assert code == 3 and "unknown policy key 'speed'" in error["error"]
    code, done = cli("route", "policy", "set", "min_mean_logprob", "-1.5", "--reason", "calm")
    assert code == 0 and done["overrides"] == {"min_mean_logprob": -1.5}
    code, done = cli(
        "route", "policy", "set", "categories", '{"hr": "(?i)salary"}', "--reason", "y"
    )
    assert code == 0
    shown = cli("route", "policy", "show")[1]
    assert shown["effective"]["min_mean_logprob"] == -1.5
    assert shown["effective"]["categories"] == {"hr": "(?i)salary"}
    assert shown["signed"]["min_mean_logprob"] is None
    assert audit_actions(cli)[-2:] == ["route policy set", "route policy set"]
    assert cli("audit", "verify")[0] == 0

    assert cli("route", "policy", "unset", "categories", "--reason", "back")[0] == 0
    assert cli("route", "policy", "unset", "categories", "--reason", "again")[0] == 24
    assert cli("route", "policy")[1]["overrides"] == {"min_mean_logprob": -1.5}
    assert cli("audit", "verify")[0] == 0
    # An override written behind the audit log's back (say, one that silences the
    # confidence rule) is reported.
    db = sqlite3.connect(appliance_paths().state_db)
    db.execute("UPDATE routing SET policy = ?", [json.dumps({"min_mean_logprob": None})])
    db.commit()
    code, error = cli("audit", "verify")
    assert code == 25 and "route policy differ" in error["error"]


def test_calibrate_sets_the_confidence_threshold_from_the_eval_cases(
    run_cli, trusted_key, tmp_path, tiny_gguf
):
    """`route calibrate` scores the release's own eval cases on its model: the threshold
    escalates the asked share of them, and --apply makes it the audited override. It reads
    nothing of a release that no longer verifies."""
    cli = json_runner(run_cli)
    ref = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1, max_tokens=16)
    assert cli("route", "calibrate", ref, "--rate", "1.5")[0] == 2
    assert cli("route", "calibrate", ref, "--apply")[0] == 3  # a policy change needs a reason
    code, found = cli("route", "calibrate", ref, "--rate", "0.34")
    assert code == 0, found
    assert found["cases"] == 3 and found["escalation_rate"] == pytest.approx(1 / 3)
    spread = found["mean_logprob"]
    assert spread["min"] < found["min_mean_logprob"] <= spread["max"] < 0
    assert cli("route", "policy")[1]["overrides"] == {}  # not applied without --apply
    code, applied = cli("route", "calibrate", ref, "--rate", "0.34", "--apply", "--reason", "x")
    assert code == 0 and applied["overrides"] == {"min_mean_logprob": applied["min_mean_logprob"]}
    assert audit_actions(cli)[-1] == "route policy set" and cli("audit", "verify")[0] == 0

    spec = appliance_paths().releases_dir / "demo" / "1.0.0" / "eval" / "spec.toml"
    spec.chmod(0o644)
    spec.write_text(spec.read_text().replace("seed = 7", "seed = 8"))
    code, refused = cli("route", "calibrate", ref)
    assert code == 13 and "spec.toml" in refused["error"]
