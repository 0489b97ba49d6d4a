"""KMS backends: one class per key management service, all behind :class:`KmsBackend`."""

from keyrotation.backends.base import KeyState, KeyVersion, KmsBackend

__all__ = ["KeyState", "KeyVersion", "KmsBackend"]
