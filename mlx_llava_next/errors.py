"""Errors users can catch. Every message names the thing that is wrong."""


class LlavaNextError(Exception):
    """Base class for every error this package raises on bad input."""


class ImageError(LlavaNextError, ValueError):
    """An image could not be read or is not usable (corrupt, empty, too large, bad shape)."""


class PromptError(LlavaNextError, ValueError):
    """A prompt does not fit its images or the model (marker count, context length)."""


class CheckpointError(LlavaNextError, ValueError):
    """A checkpoint is missing, incomplete, corrupt or not a LLaVA-NeXT model."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is a model type this package does not run."""


class OutputError(LlavaNextError, OSError):
    """An output cannot be written (exists, read-only, full disk, not ours to replace)."""
