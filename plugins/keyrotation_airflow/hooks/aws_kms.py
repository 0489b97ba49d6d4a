"""The hook of an ``aws`` connection for AWS KMS: key classes of backend ``aws_kms``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from keyrotation_airflow.hooks.kms import KmsHookMixin

if TYPE_CHECKING:
    from keyrotation.config import KeyClass


class AwsKmsHook(AwsBaseHook, KmsHookMixin):
    """
    An ``aws`` connection's boto3 KMS client, through the amazon provider's ``AwsBaseHook`` (keys, profiles or
    role assumption; ``endpoint_url`` in its extra reaches a local AWS-API server), for backend ``aws_kms``.

    :param aws_conn_id: The AWS connection.
    :param purpose: What needs the connection, for the error when it cannot be reached.
    :param kwargs: As ``AwsBaseHook`` takes them (``region_name``, ``verify``, ``config``), but ``client_type``.
    """

    conn_name_attr = "aws_conn_id"
    default_conn_name = "aws_default"
    conn_type = "aws"
    hook_name = "Key rotation KMS: AWS KMS"

    def __init__(self, *args: Any, purpose: str = KmsHookMixin.purpose, **kwargs: Any) -> None:
        kwargs["client_type"] = "kms"
        super().__init__(*args, **kwargs)
        self.purpose = purpose

    @classmethod
    def for_key_class(cls, kc: KeyClass, role: str) -> Self:
        return cls(aws_conn_id=kc.conn_for(role), region_name=kc.aws_options.region_name,
                   purpose=cls.key_class_purpose(kc))

    def get_conn(self) -> Any:
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:  # role assumption, if the connection asks for it, calls STS here
            return super().get_conn()
        except BotoConnectionError as exc:  # EndpointConnectionError, ConnectTimeoutError, ...
            where = exc.kwargs.get("endpoint_url") or f"region {self.region_name}"
            raise self._unreachable(str(where), exc) from None
