"""A shim for tools that still call setup.py directly: every setting is in pyproject.toml."""
from setuptools import setup

setup()
