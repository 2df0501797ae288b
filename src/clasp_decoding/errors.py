"""Exceptions with messages meant for users: each names the problem in one sentence."""

from __future__ import annotations


class ClaspError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ClaspError, ValueError):
    """A generation parameter is out of range or inconsistent with another."""


class InputError(ClaspError, ValueError):
    """A prompt is empty, too long for the model, or otherwise unusable."""


class ModelLoadError(ClaspError):
    """A model name or path cannot be resolved, fetched, verified or loaded."""


class UnsupportedModelError(ModelLoadError):
    """The model loaded, but its architecture cannot be driven layer by layer."""


class RunnerBusyError(ClaspError, RuntimeError):
    """A runner with a single static cache is already serving another live generation."""
