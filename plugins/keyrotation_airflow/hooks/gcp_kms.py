"""The hook of a ``google_cloud_platform`` connection for Cloud KMS: key classes of backend ``gcp_kms``, and the
async client the trigger polls a pending version with."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Self

from airflow.providers.google.cloud.hooks.kms import CloudKMSHook

from keyrotation_airflow.hooks.kms import KmsHookMixin

if TYPE_CHECKING:
    from keyrotation.config import KeyClass


class GcpKmsHook(CloudKMSHook, KmsHookMixin):
    """
    A ``google_cloud_platform`` connection's Cloud KMS client, through the google provider's ``CloudKMSHook``
    (key file, key dict, ADC or impersonation), for backend ``gcp_kms``; ``kms_endpoint`` in its extra
    (``host:port``) reaches another Cloud KMS endpoint, e.g. a regional or private one. Its async client is
    what the trigger polls a pending version with.

    :param gcp_conn_id: The Google Cloud connection.
    :param impersonation_chain: Service accounts to impersonate, as ``CloudKMSHook`` takes them.
    :param purpose: What needs the connection, for the error when it cannot be reached.
    """

    conn_name_attr = "gcp_conn_id"
    default_conn_name = "google_cloud_default"
    conn_type = "google_cloud_platform"
    hook_name = "Key rotation KMS: Google Cloud KMS"

    def __init__(self, gcp_conn_id: str = default_conn_name, impersonation_chain: str | list[str] | None = None,
                 *, purpose: str = KmsHookMixin.purpose, **kwargs: Any) -> None:
        super().__init__(gcp_conn_id=gcp_conn_id, impersonation_chain=impersonation_chain, **kwargs)
        self.purpose = purpose
        self._client: Any = None
        self._async_client: Any = None

    @classmethod
    def for_key_class(cls, kc: KeyClass, role: str) -> Self:
        return cls(kc.conn_for(role), kc.gcp_options.impersonation_chain, purpose=cls.key_class_purpose(kc))

    @property
    def kms_endpoint(self) -> str | None:
        """``kms_endpoint`` of the connection's extra, if set."""
        from airflow.providers.google.common.hooks.base_google import get_field

        return get_field(self.extras, "kms_endpoint")

    def client_args(self) -> dict[str, Any]:
        """What ``CloudKMSHook.get_conn`` builds its client with, at the ``kms_endpoint`` of the extra; an async
        client must be built inside its event loop, from these."""
        from airflow.providers.google.common.consts import CLIENT_INFO

        return {"credentials": self.get_credentials(), "client_info": CLIENT_INFO,
                "client_options": self.get_client_options(self.kms_endpoint)}

    def get_conn(self) -> Any:
        """A ``KeyManagementServiceClient``."""
        from google.api_core import exceptions as gexc
        from google.auth.exceptions import TransportError
        from google.cloud.kms_v1 import KeyManagementServiceClient

        if self._client is None:
            try:
                self._client = KeyManagementServiceClient(**self.client_args())
            except (gexc.ServiceUnavailable, gexc.RetryError, TransportError) as exc:
                raise self._unreachable(self.kms_endpoint or "cloudkms.googleapis.com", exc) from None
        return self._client

    async def get_async_conn(self) -> Any:
        """A ``KeyManagementServiceAsyncClient`` bound to the running event loop, made on the first call (the
        credentials are read in a thread)."""
        from google.cloud.kms_v1 import KeyManagementServiceAsyncClient

        if self._async_client is None:
            args = await asyncio.to_thread(self.client_args)
            self._async_client = KeyManagementServiceAsyncClient(**args)
        return self._async_client

    async def aversion_state(self, kc: KeyClass, version: int) -> tuple[bool, str]:
        """The CryptoKeyVersion's state (HSM and external versions are ``PENDING_GENERATION`` first), read with
        the async client: usable once ``ENABLED``."""
        from keyrotation.backends.gcp_kms import State, version_resource_name

        client = await self.get_async_conn()
        described = await client.get_crypto_key_version(name=version_resource_name(kc.key_ref, version))
        return described.state == State.ENABLED, described.state.name
