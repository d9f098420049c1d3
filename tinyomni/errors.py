"""The errors a user sees. Each names the problem (the file, the limit, the part) in plain words.

They subclass ValueError / FileNotFoundError so callers that already catch those keep working.
"""


class TinyOmniError(Exception):
    """Base class for every error tinyomni raises on purpose."""


class InputError(TinyOmniError, ValueError):
    """Bad user input: a corrupt image, an unknown audio format, an unknown content part, ..."""


class ConfigError(TinyOmniError, ValueError):
    """A config.json (or recipe) that is malformed or inconsistent."""


class CheckpointError(TinyOmniError, FileNotFoundError):
    """A checkpoint that is missing, truncated or does not fit the config."""


class ContextLengthError(InputError):
    """A prompt (with its media tokens) that does not fit in the model's context."""


class MissingDependencyError(TinyOmniError, RuntimeError):
    """A system tool that a feature needs (espeak-ng, a TrueType font) is not installed."""
