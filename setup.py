"""Build script: packages plus the native extension (see csrc/). Metadata lives in pyproject.toml."""

from setuptools import setup

setup()
