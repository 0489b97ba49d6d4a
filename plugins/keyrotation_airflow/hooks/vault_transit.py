"""The hook of a Vault/OpenBao connection for the Transit engine: key classes of backend ``vault_transit`` and the
ledger's anchor key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from airflow.providers.hashicorp.hooks.vault import VaultHook
from airflow.sdk.log import mask_secret

from keyrotation_airflow.hooks.kms import KmsHookMixin

if TYPE_CHECKING:
    from keyrotation.config import KeyClass


def _vault_session() -> Any:
    """The session the hashicorp provider would make, except that urllib3 does not retry a connection that
    fails: the backend's RetryPolicy does, with backoff; and urllib3 logs each of its own retries with the
    request's path, so a KMS down at set-up would fill the task log with provider internals."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    adapter = HTTPAdapter(max_retries=Retry(total=3, connect=0, backoff_factor=0.1,
                                            status_forcelist=[412, 500, 502, 503], raise_on_status=False))
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session



class VaultTransitHook(VaultHook, KmsHookMixin):
    """
    A Vault/OpenBao connection (any auth type the hashicorp provider's ``VaultHook`` supports), logged in, for
    the Transit engine: the key classes of backend ``vault_transit`` and the ledger's anchor key. The token an
    auth method resolves is masked in task logs.

    :param vault_conn_id: The Vault/OpenBao connection.
    :param purpose: What needs the connection, for the error when it cannot be reached.
    """

    conn_name_attr = "vault_conn_id"
    default_conn_name = "vault_default"
    conn_type = "vault"
    hook_name = "Key rotation KMS: Vault/OpenBao Transit"

    def __init__(self, vault_conn_id: str = default_conn_name, *, purpose: str = KmsHookMixin.purpose,
                 **kwargs: Any) -> None:
        kwargs.setdefault("session", _vault_session())
        super().__init__(vault_conn_id=vault_conn_id, **kwargs)
        self.vault_conn_id = vault_conn_id  # VaultHook keeps only the connection it read
        self.purpose = purpose

    @classmethod
    def for_key_class(cls, kc: KeyClass, role: str) -> Self:
        return cls(kc.conn_for(role), purpose=cls.key_class_purpose(kc))

    def get_conn(self) -> Any:
        """An ``hvac.Client``, logged in (AppRole, Kubernetes, ...: the token is looked up here)."""
        import requests

        try:
            client = super().get_conn()
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise self._unreachable(self.vault_client.url, exc) from None
        if client.token:  # resolved by an auth method (AppRole, Kubernetes, ...): not masked as a password
            mask_secret(client.token)
        return client
