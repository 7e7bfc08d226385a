"""What model loaders raise, and the check for an optional package; below every loader, so that the text models
(:mod:`dorafit.train.models`) and the image model families (:mod:`dorafit.train.vision`) share them without
importing each other."""

from __future__ import annotations

import importlib.util


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


def require_package(module: str, pip_command: str, what: str) -> None:
    """A :class:`ModelError` with the install command if ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"{what} needs the Python package {module!r}; install it with: {pip_command}")
