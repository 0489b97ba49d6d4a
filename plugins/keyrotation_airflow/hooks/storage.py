"""The hook that gives a dataset's storage (filesystem, S3 client) its credentials."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from keyrotation.config import Dataset, KeyClass
from keyrotation.stores.filesystems import AwsCredentials, Storage, split_location


class DatasetStorageHook(BaseHook):
    """
    Resolves the Airflow connection of a dataset's storage into :class:`~keyrotation.stores.filesystems.Storage`.

    ``s3://`` locations use an ``aws`` connection through the amazon provider's ``AwsBaseHook``: the
    dataset's ``conn_id``, else the key class's connection for ``role`` when its backend is
    ``aws_kms``. A ``sql_table`` dataset's ``conn_id`` (a postgres connection) gives the database URL.
    Local paths need no connection.

    :param dataset: The dataset whose storage to reach.
    :param key_class: Its key class.
    :param role: ``rotate``, ``reencrypt``, ``retire`` or ``report``.
    """

    hook_name = "Key rotation dataset storage"

    def __init__(self, dataset: Dataset, key_class: KeyClass, role: str = "reencrypt", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset
        self.key_class = key_class
        self.role = role
        default = key_class.conn_for(role) if key_class.backend == "aws_kms" else None
        self.conn_id = dataset.conn_id or default

    def get_conn(self) -> Storage:
        if self.dataset.format == "sql_table":
            if not self.dataset.conn_id:
                return Storage()  # the location is the SQLAlchemy URL
            uri = self.get_connection(self.dataset.conn_id).get_uri()
            return Storage(sql_url=uri.replace("postgres://", "postgresql+psycopg2://", 1))
        if split_location(self.dataset.location)[0] == "s3" and not self.conn_id:
            raise ValueError(f"dataset {self.dataset.name!r} is on S3 ({self.dataset.location}) but names no "
                             "conn_id, and its key class's backend is not aws_kms: set datasets[].conn_id")
        region = self.key_class.aws_options.region_name if self.key_class.aws else None
        return storage_for(self.dataset.location, self.conn_id, region)


def storage_for(location: str, conn_id: str | None, region_name: str | None = None) -> Storage:
    """The storage of ``location``: S3 through the ``aws`` connection ``conn_id``; local paths as they are."""
    if split_location(location)[0] != "s3" or not conn_id:
        return Storage()
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3", region_name=region_name)
    credentials = hook.get_credentials()
    return Storage(AwsCredentials(
        access_key=credentials.access_key, secret_key=credentials.secret_key, session_token=credentials.token,
        region_name=hook.conn_region_name or "us-east-1", endpoint_url=hook.conn_config.endpoint_url))
