"""Exceptions raised by the core. Messages name the thing at fault and never carry key material."""

from __future__ import annotations


class KeyRotationError(Exception):
    """Base class for every error raised by keyrotation."""


class ConfigError(KeyRotationError):
    """A configuration file or value is invalid."""


class BackendError(KeyRotationError):
    """A KMS backend refused or failed an operation."""


class PermissionDenied(BackendError):
    """The KMS refused the credentials for this operation; retrying will not help."""


class KmsUnreachable(BackendError):
    """The KMS could not be reached (or stayed throttled) after every retry: worth retrying later."""


class KeyNotFoundError(BackendError):
    """The configured master key does not exist in the KMS."""


class PartitionError(KeyRotationError):
    """A partition could not be read, re-encrypted or validated."""

    def __init__(self, partition: str, message: str) -> None:
        super().__init__(f"partition {partition}: {message}")
        self.partition = partition


class ValidationError(PartitionError):
    """A partition's decrypted content does not match its recorded digest."""


class RetirementRefused(KeyRotationError):
    """The retirement gate refused to retire key versions."""


class RetirementNotPossible(RetirementRefused):
    """The KMS keeps old versions usable for good (AWS KMS key material): there is nothing to retire."""
