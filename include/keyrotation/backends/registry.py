"""The KMS backends by name, in the spirit of Tink's KMS client registry: the one way to open the backend of a
key class, whoever asks (the Airflow hook, the client library, the sidecar, the tests and benchmarks)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keyrotation.backends.base import ClientOptions, KmsBackend
from keyrotation.errors import ConfigError

if TYPE_CHECKING:
    from keyrotation.backends.retry import RetryPolicy
    from keyrotation.config import KeyClass

#: ``backend:`` of a key class -> its class, imported on first use (each pulls in its KMS's client library).
BACKENDS: dict[str, str] = {
    "vault_transit": "keyrotation.backends.vault_transit:VaultTransitBackend",
    "aws_kms": "keyrotation.backends.aws_kms:AwsKmsBackend",
    "gcp_kms": "keyrotation.backends.gcp_kms:GcpKmsBackend",
}


def backend_class(name: str) -> type[KmsBackend]:
    if name not in BACKENDS:
        raise ConfigError(f"backend {name!r} is not one of: {', '.join(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def open_backend(kc: KeyClass, client: Any, retry: RetryPolicy | None = None) -> KmsBackend:
    """The backend of key class ``kc`` over ``client`` (an ``hvac.Client``, a boto3 KMS client or a Cloud KMS
    ``KeyManagementServiceClient``)."""
    return backend_class(kc.backend).from_key_class(kc, client, retry)


def client_from_environment(kc: KeyClass, options: ClientOptions | None = None) -> Any:
    """The KMS client of key class ``kc`` for a process outside Airflow, from its environment."""
    return backend_class(kc.backend).client_from_environment(kc, options or ClientOptions())
