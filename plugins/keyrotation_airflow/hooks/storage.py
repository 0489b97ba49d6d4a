"""The hook that gives a dataset's storage (filesystem, S3 client) its credentials."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from keyrotation.config import Dataset, KeyClass
from keyrotation.stores.filesystems import AwsCredentials, GcpCredentials, Storage, split_location

#: The key class backend whose connection also reaches each object store, when a dataset names none.
_CLOUD_OF_SCHEME = {"s3": "aws_kms", "gs": "gcp_kms"}


class DatasetStorageHook(BaseHook):
    """
    Resolves the Airflow connection of a dataset's storage into :class:`~keyrotation.stores.filesystems.Storage`.

    ``s3://`` locations use an ``aws`` connection through the amazon provider's ``AwsBaseHook``, and
    ``gs://`` locations a ``google_cloud_platform`` connection through the google provider's
    ``GoogleBaseHook`` (``storage_endpoint`` in its extra reaches another GCS endpoint; a connection
    with no key and a ``storage_endpoint`` is anonymous, for a local emulator): the dataset's
    ``conn_id``, else the key class's connection for ``role`` when its backend is of the same cloud.
    A ``sql_table`` dataset's ``conn_id`` (a postgres connection) gives the database URL. Local
    paths need no connection.

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
        scheme = split_location(dataset.location)[0] if dataset.format != "sql_table" else ""
        default = key_class.conn_for(role) if _CLOUD_OF_SCHEME.get(scheme) == key_class.backend else None
        self.conn_id = dataset.conn_id or default

    def get_conn(self) -> Storage:
        if self.dataset.format == "sql_table":
            if not self.dataset.conn_id:
                return Storage()  # the location is the SQLAlchemy URL
            uri = self.get_connection(self.dataset.conn_id).get_uri()
            return Storage(sql_url=uri.replace("postgres://", "postgresql+psycopg2://", 1))
        scheme = split_location(self.dataset.location)[0]
        if scheme in _CLOUD_OF_SCHEME and not self.conn_id:
            raise ValueError(f"dataset {self.dataset.name!r} is on {scheme}:// ({self.dataset.location}) but names "
                             f"no conn_id, and its key class's backend is not {_CLOUD_OF_SCHEME[scheme]}: set "
                             "datasets[].conn_id")
        region = self.key_class.aws_options.region_name if self.key_class.aws else None
        return storage_for(self.dataset.location, self.conn_id, region)


def storage_for(location: str, conn_id: str | None, region_name: str | None = None) -> Storage:
    """The storage of ``location``: S3 through the ``aws`` connection ``conn_id``, GCS through the
    ``google_cloud_platform`` connection ``conn_id``; local paths as they are."""
    scheme = split_location(location)[0]
    if scheme == "gs" and conn_id:
        return Storage(gcp=gcp_credentials(conn_id))
    if scheme != "s3" or not conn_id:
        return Storage()
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3", region_name=region_name)
    credentials = hook.get_credentials()
    return Storage(AwsCredentials(
        access_key=credentials.access_key, secret_key=credentials.secret_key, session_token=credentials.token,
        region_name=hook.conn_region_name or "us-east-1", endpoint_url=hook.conn_config.endpoint_url))


def gcp_credentials(conn_id: str) -> GcpCredentials:
    """GCS credentials, project and endpoint of a ``google_cloud_platform`` connection."""
    from airflow.providers.google.common.hooks.base_google import GoogleBaseHook

    hook = GoogleBaseHook(gcp_conn_id=conn_id)
    endpoint = hook._get_field("storage_endpoint", None)
    keyed = any(hook._get_field(f, None) for f in ("key_path", "keyfile_dict", "credential_config_file",
                                                   "key_secret_name"))
    if endpoint and not keyed:  # a local emulator: anonymous, as GCS emulators expect
        return GcpCredentials(None, hook._get_field("project", None), endpoint)
    credentials, project = hook.get_credentials_and_project_id()
    return GcpCredentials(credentials, hook._get_field("project", None) or project, endpoint)
