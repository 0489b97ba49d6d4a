"""The hook that turns a key class's Airflow connection into a KMS backend."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

from keyrotation.backends.base import KmsBackend
from keyrotation.config import KeyClass
from keyrotation.errors import KmsUnreachable


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


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a failed connection (``ConnectionRefusedError: [Errno 111] Connection refused``),
    not the provider's message, which names the request's path and connection pool, on one line."""
    current, seen = exc, {id(exc)}
    while not (isinstance(current, OSError) and current.strerror):
        error = getattr(current, "kwargs", None)
        nested = (getattr(current, "reason", None), *current.args,
                  error.get("error") if isinstance(error, dict) else None, current.__cause__, current.__context__)
        following = next((n for n in nested if isinstance(n, BaseException) and id(n) not in seen), None)
        if following is None:
            break
        current = following
        seen.add(id(current))
    lines = str(current).strip().splitlines()
    return f"{type(current).__name__}: {lines[0]}" if lines else type(current).__name__


def vault_client(conn_id: str, what: str) -> Any:
    """An ``hvac.Client`` from the Vault/OpenBao connection ``conn_id`` (``vault`` type, any auth type the
    hashicorp provider's ``VaultHook`` supports), logged in; its token masked in task logs.

    :raises KmsUnreachable: naming ``what`` needed it, the connection, where it points and the cause.
    """
    import requests
    from airflow.providers.hashicorp.hooks.vault import VaultHook

    vault = VaultHook(vault_conn_id=conn_id, session=_vault_session())
    try:  # logs in (AppRole, Kubernetes, ...) and looks the token up
        client = vault.get_conn()
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise KmsUnreachable(f"KMS unreachable: {what} through connection {conn_id!r} at "
                             f"{vault.vault_client.url}: {_root_cause(exc)}") from None
    if client.token:  # resolved by an auth method (AppRole, Kubernetes, ...): not masked as a password
        mask_secret(client.token)
    return client


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

    def _unreachable(self, where: str, exc: BaseException) -> KmsUnreachable:
        return KmsUnreachable(f"KMS unreachable: key class {self.key_class.name!r} ({self.key_class.backend}) "
                              f"through connection {self.conn_id!r} at {where}: {_root_cause(exc)}")

    def _cloud_kms_hook(self) -> Any:
        from airflow.providers.google.cloud.hooks.kms import CloudKMSHook

        return CloudKMSHook(gcp_conn_id=self.conn_id,
                            impersonation_chain=self.key_class.gcp_options.impersonation_chain)

    def get_conn(self) -> Any:
        """The backend's client (``hvac.Client`` for Vault/OpenBao Transit, a boto3 KMS client for AWS, a
        ``KeyManagementServiceClient`` for Cloud KMS).

        :raises KmsUnreachable: the set-up needed the KMS (or the cloud's credentials endpoint) and could not
            reach it; the message names the key class, the connection and where it points, and the cause.
        """
        if self.key_class.backend == "gcp_kms":
            from google.api_core import exceptions as gexc
            from google.auth.exceptions import TransportError

            hook = self._cloud_kms_hook()
            endpoint = hook._get_field("kms_endpoint", None)
            try:
                if not endpoint:
                    return hook.get_conn()
                from google.cloud.kms_v1 import KeyManagementServiceClient

                return KeyManagementServiceClient(**self._client_args(hook))
            except (gexc.ServiceUnavailable, gexc.RetryError, TransportError) as exc:
                raise self._unreachable(endpoint or "cloudkms.googleapis.com", exc) from None
        if self.key_class.backend == "aws_kms":
            from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
            from botocore.exceptions import ConnectionError as BotoConnectionError

            aws = AwsBaseHook(aws_conn_id=self.conn_id, client_type="kms",
                              region_name=self.key_class.aws_options.region_name)
            try:  # role assumption, if the connection asks for it, calls STS here
                return aws.get_conn()
            except BotoConnectionError as exc:  # EndpointConnectionError, ConnectTimeoutError, ...
                where = exc.kwargs.get("endpoint_url") or f"region {aws.region_name}"
                raise self._unreachable(str(where), exc) from None
        if self.key_class.backend == "vault_transit":
            return vault_client(self.conn_id, f"key class {self.key_class.name!r} ({self.key_class.backend})")
        raise ValueError(f"key class {self.key_class.name!r}: unsupported backend {self.key_class.backend!r}")

    def get_backend(self) -> KmsBackend:
        if self._backend is None:
            from keyrotation.backends.registry import open_backend

            self._backend = open_backend(self.key_class, self.get_conn())
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
