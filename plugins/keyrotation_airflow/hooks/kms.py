"""The hook that turns a key class's Airflow connection into a KMS backend."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

from keyrotation.backends.base import KmsBackend
from keyrotation.config import KeyClass


class KeyClassKmsHook(BaseHook):
    """
    Connects to the KMS of a key class and returns its :class:`~keyrotation.backends.base.KmsBackend`.

    The connection is the key class's connection for ``role`` (``connections.<role>``, else
    ``conn_id``): for ``vault_transit`` a Vault connection (``vault``/``vaults`` type, any auth type
    the hashicorp provider's ``VaultHook`` supports), so credentials come from Airflow connections
    or a secrets backend, never from config files, and each role's token can do only its part.

    :param key_class: The key class whose master key to reach.
    :param role: ``rotate``, ``reencrypt``, ``retire`` or ``report``.
    """

    hook_name = "Key rotation KMS"

    def __init__(self, key_class: KeyClass, role: str = "rotate", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.role = role
        self.conn_id = key_class.conn_for(role)
        self._backend: KmsBackend | None = None

    def get_conn(self) -> Any:
        """The backend's client (``hvac.Client`` for Vault/OpenBao Transit)."""
        if self.key_class.backend == "vault_transit":
            from airflow.providers.hashicorp.hooks.vault import VaultHook

            client = VaultHook(vault_conn_id=self.conn_id).get_conn()
            if client.token:  # resolved by an auth method (AppRole, Kubernetes, ...): not masked as a password
                mask_secret(client.token)
            return client
        raise ValueError(f"key class {self.key_class.name!r}: unsupported backend {self.key_class.backend!r}")

    def get_backend(self) -> KmsBackend:
        if self._backend is None:
            if self.key_class.backend == "vault_transit":
                from keyrotation.backends.vault_transit import VaultTransitBackend

                self._backend = VaultTransitBackend(self.get_conn(), self.key_class.key_ref,
                                                    self.key_class.mount_point)
            else:
                raise ValueError(f"key class {self.key_class.name!r}: unsupported backend {self.key_class.backend!r}")
        return self._backend
