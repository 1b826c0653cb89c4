"""Custom SLM Appliance: a signed, air-gapped small-language-model service."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # The version comes from the installed package's metadata, read only when asked for:
    # importlib.metadata costs ~20 ms at every start of the command line.
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("custom-slm-appliance")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0"
