"""The error hierarchy: every user-facing failure is an LlmcError with a readable message."""


class LlmcError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits non-zero."""

    exit_code = 1


class ConfigError(LlmcError):
    """model.yaml (or a CLI option) is malformed or asks for something unsupported."""

    exit_code = 2


class ModelImportError(LlmcError):
    """The checkpoint is missing, corrupt, or of an unsupported architecture."""


class PassError(LlmcError):
    """A compiler pass refused its input or failed."""


class EmitError(LlmcError):
    """An engine could not be emitted for a target."""


class BundleError(LlmcError):
    """A bundle is missing, tampered with, truncated or incompatible."""


class RequestError(LlmcError):
    """A generation request is invalid (prompt too long, bad sampling parameters...); param names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
