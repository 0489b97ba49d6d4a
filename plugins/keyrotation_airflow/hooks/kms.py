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
    ``conn_id``), so credentials come from Airflow connections or a secrets backend, never from
    config files, and each role's credentials can do only its part:

    * ``vault_transit``: a Vault connection (``vault`` type, any auth type the hashicorp provider's
      ``VaultHook`` supports).
    * ``aws_kms``: an ``aws`` connection, through the amazon provider's ``AwsBaseHook`` (keys,
      profiles or role assumption; ``endpoint_url`` in its extra reaches a local AWS-API server).
    * ``gcp_kms``: a ``google_cloud_platform`` connection, through the google provider's
      ``CloudKMSHook`` (key file, key dict, ADC or impersonation); ``kms_endpoint`` in its extra
      (``host:port``) reaches another Cloud KMS endpoint, e.g. a regional or private one.

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

    def _cloud_kms_hook(self) -> Any:
        from airflow.providers.google.cloud.hooks.kms import CloudKMSHook

        return CloudKMSHook(gcp_conn_id=self.conn_id,
                            impersonation_chain=self.key_class.gcp_options.impersonation_chain)

    def get_conn(self) -> Any:
        """The backend's client (``hvac.Client`` for Vault/OpenBao Transit, a boto3 KMS client for AWS, a
        ``KeyManagementServiceClient`` for Cloud KMS)."""
        if self.key_class.backend == "gcp_kms":
            hook = self._cloud_kms_hook()
            if not hook._get_field("kms_endpoint", None):
                return hook.get_conn()
            from google.cloud.kms_v1 import KeyManagementServiceClient

            return KeyManagementServiceClient(**self._client_args(hook))
        if self.key_class.backend == "aws_kms":
            from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

            return AwsBaseHook(aws_conn_id=self.conn_id, client_type="kms",
                               region_name=self.key_class.aws_options.region_name).get_conn()
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
            elif self.key_class.backend == "aws_kms":
                from keyrotation.backends.aws_kms import AwsKmsBackend

                options = self.key_class.aws_options
                self._backend = AwsKmsBackend(
                    self.get_conn(), self.key_class.key_ref, strategy=options.strategy, key_class=self.key_class.name,
                    rotation_period_days=options.rotation_period_days,
                    deletion_window_days=options.deletion_window_days,
                    max_requests_per_second=options.max_requests_per_second)
            elif self.key_class.backend == "gcp_kms":
                from keyrotation.backends.gcp_kms import GcpKmsBackend

                options, rotation = self.key_class.gcp_options, self.key_class.rotation
                self._backend = GcpKmsBackend(
                    self.get_conn(), self.key_class.key_ref, key_class=self.key_class.name,
                    protection_level=options.protection_level,
                    rotation_period=rotation.due_after if options.sync_rotation_schedule else None,
                    destroy_scheduled_duration=options.destroy_scheduled_duration)
            else:
                raise ValueError(f"key class {self.key_class.name!r}: unsupported backend {self.key_class.backend!r}")
        return self._backend

    def cloud_kms_client_args(self) -> dict[str, Any]:
        """Credentials and client options of the connection (gcp_kms), to build a Cloud KMS client with; an
        async client must be built inside its event loop, from these."""
        if self.key_class.backend != "gcp_kms":
            raise ValueError(f"key class {self.key_class.name!r}: backend {self.key_class.backend} is not gcp_kms")
        return self._client_args(self._cloud_kms_hook())

    @staticmethod
    def _client_args(hook: Any) -> dict[str, Any]:
        """What ``CloudKMSHook.get_conn`` builds its client with, and the ``kms_endpoint`` of the extra."""
        from airflow.providers.google.common.consts import CLIENT_INFO

        return {"credentials": hook.get_credentials(), "client_info": CLIENT_INFO,
                "client_options": hook.get_client_options(hook._get_field("kms_endpoint", None))}
