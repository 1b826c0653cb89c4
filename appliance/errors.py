"""One error hierarchy: every user-facing failure is a one-line message and an exit code.

Exit codes are part of the interface (scripts branch on them); they are documented in
SECURITY.md and must not be renumbered.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance reports to a user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(ApplianceError):
    """Bad arguments or a bad input file that is not a bundle (bundle.toml, key file)."""

    exit_code = 3


class PromptTooLong(UsageError):
    """The prompt leaves no room in a slot's context for even one generated token."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens; this model's context holds {context}"
        )


class HostError(ApplianceError):
    """The host failed us: disk full, permission denied, a file vanished."""

    exit_code = 5


class KeyStoreError(ApplianceError):
    """A trust-store change that cannot be made (unknown key, revoked key re-trusted)."""

    exit_code = 4


class VerificationError(ApplianceError):
    """A bundle failed verification. Subclasses give each kind of failure its own code."""

    exit_code = 10


class SignatureError(VerificationError):
    """Signature missing, malformed, or not matching its payload."""

    exit_code = 10


class UntrustedKeyError(VerificationError):
    """Signed only by keys that are not trusted, or that were revoked."""

    exit_code = 11


class ThresholdError(VerificationError):
    """Fewer distinct trusted keys signed than the trust store's threshold requires."""

    exit_code = 12


class IntegrityError(VerificationError):
    """A file's hash or size differs from the signed manifest, or a file is missing/extra."""

    exit_code = 13


class UnsafeArchiveError(VerificationError):
    """The tar holds something that must never be extracted (links, '..', devices, ...)."""

    exit_code = 14


class GGUFError(VerificationError):
    """The GGUF file's header is malformed or out of bounds."""

    exit_code = 15


class UnreadableInputError(VerificationError):
    """The input cannot be read at all (missing, permission denied, not a tar)."""

    exit_code = 16


class ModelLoadError(ApplianceError):
    """llama.cpp could not load the model in a child process (the load probe): it aborted,
    crashed, timed out or refused the file. Nothing long-lived ever loads such a model."""

    exit_code = 17


class StoreError(ApplianceError):
    """A release-store operation that cannot be done in the store's current state."""

    exit_code = 24


class StoreBusyError(StoreError):
    """Another admin operation holds the store's lock."""

    exit_code = 20


class ReplayError(StoreError):
    """A sequence at or below one already seen (replay, downgrade) or under the floor."""

    exit_code = 21


class FrozenError(StoreError):
    """Releases are frozen: nothing activates until an admin unfreezes."""

    exit_code = 22


class GateError(StoreError):
    """No passing eval report for this release, spec hash and host."""

    exit_code = 23


class AuditChainError(StoreError):
    """The audit log's hash chain is broken (a row was edited, deleted or reordered), or the
    state it records differs from the live state."""

    exit_code = 25


class EvalTargetError(ApplianceError):
    """The service an eval runs against does not serve the exact release being evaluated."""

    exit_code = 26


class FleetError(ApplianceError):
    """HAProxy's runtime API cannot be reached or refused a change, or names no such node."""

    exit_code = 50


class NodeNotSettled(FleetError):
    """A fleet wait ran out: a drained node still had requests in flight, or a node did not
    become ready with the expected release in time."""

    exit_code = 51


class CanaryFailed(FleetError):
    """A fleet canary node failed requests beyond the allowed rate, or lost readiness,
    during its watch."""

    exit_code = 52


class CanaryInconclusive(FleetError):
    """A fleet canary node answered too few requests during its watch to judge it."""

    exit_code = 53


class EngineError(ApplianceError):
    """llama.cpp could not load a model or decode a batch."""

    exit_code = 30


class ChatTemplateError(ApplianceError):
    """The chat template could not render these messages."""

    exit_code = 31


class GateFailed(GateError):
    """The release's latest eval report failed a gate criterion, or could not judge
    latency and cost on a busy host: the exit code is the criterion's (40-44) or 45
    (appliance.evals.report.CRITERIA and INCONCLUSIVE_EXIT)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
