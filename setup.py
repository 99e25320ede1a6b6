"""Package list only; everything else is in pyproject.toml.

The code packages are discovered (so a new subpackage of ``app`` or ``retrievers`` ships without an edit here); the
repository's ``skills/`` and ``prompts/`` folders are added as the data-only packages ``fsb_assets.skills`` and
``fsb_assets.prompts`` (mapped in pyproject.toml's ``[tool.setuptools.package-dir]``), which pyproject.toml alone
cannot combine with discovery.
"""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["app*", "retrievers*"]), "fsb_assets.skills", "fsb_assets.prompts"])
