"""Custom SLM Appliance: a signed, air-gapped small-language-model service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("custom-slm-appliance")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
