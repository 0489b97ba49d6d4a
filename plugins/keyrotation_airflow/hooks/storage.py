"""The hook that gives a dataset's storage (filesystem, S3 client, SQL database) its credentials."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from keyrotation.config import Dataset, KeyClass
from keyrotation.stores.filesystems import AwsCredentials, GcpCredentials, Storage, split_location

#: Object stores that need a connection (a dataset's own, or its key class's where the KMS is of the same cloud).
_CLOUD_SCHEMES = ("s3", "gs")


class DatasetStorageHook(BaseHook):
    """
    Resolves the Airflow connection of a dataset's location into :class:`~keyrotation.stores.filesystems.Storage`.

    ``s3://`` locations use an ``aws`` connection through the amazon provider's ``AwsBaseHook``, and
    ``gs://`` locations a ``google_cloud_platform`` connection through the google provider's
    ``GoogleBaseHook`` (``storage_endpoint`` in its extra reaches another GCS endpoint; a connection
    with no key and a ``storage_endpoint`` is anonymous, for a local emulator). A ``sql_table`` dataset's
    connection (a postgres connection) gives the database URL; without one, the location is the URL. Local
    paths need no connection. :func:`dataset_storage_hook` picks a dataset's connection.

    :param location: The dataset's location.
    :param storage_conn_id: Its connection; None: none (local paths, public URIs, a SQL URL as the location).
    :param region_name: The AWS region of an ``s3://`` location (default: the connection's).
    :param sql_table: The location is a SQL table.
    """

    conn_name_attr = "storage_conn_id"
    hook_name = "Key rotation dataset storage"

    def __init__(self, location: str, storage_conn_id: str | None = None, *, region_name: str | None = None,
                 sql_table: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.location = location
        self.storage_conn_id = storage_conn_id
        self.region_name = region_name
        self.sql_table = sql_table

    def get_conn(self) -> Storage:
        if not self.sql_table:
            return storage_for(self.location, self.storage_conn_id, self.region_name)
        if not self.storage_conn_id:
            return Storage()  # the location is the SQLAlchemy URL
        uri = self.get_connection(self.storage_conn_id).get_uri()
        return Storage(sql_url=uri.replace("postgres://", "postgresql+psycopg2://", 1))


def dataset_storage_hook(dataset: Dataset, kc: KeyClass, role: str = "reencrypt") -> DatasetStorageHook:
    """The storage hook of ``dataset``: on its ``conn_id``, else on the key class's connection for ``role``
    (rotate, reencrypt, retire, report) when its backend is of the location's cloud.

    :raises ValueError: an ``s3://`` or ``gs://`` dataset with no connection to reach it.
    """
    if dataset.format == "sql_table":
        return DatasetStorageHook(dataset.location, dataset.conn_id, sql_table=True)
    scheme = split_location(dataset.location)[0]
    same_cloud = kc.backend_class.storage_scheme == scheme
    conn_id = dataset.conn_id or (kc.conn_for(role) if same_cloud else None)
    if scheme in _CLOUD_SCHEMES and not conn_id:
        raise ValueError(f"dataset {dataset.name!r} is on {scheme}:// ({dataset.location}) but names "
                         f"no conn_id, and its key class's {kc.backend} connection does not reach {scheme}://: set "
                         "datasets[].conn_id")
    return DatasetStorageHook(dataset.location, conn_id, region_name=kc.aws_options.region_name if kc.aws else None)


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
    from airflow.providers.google.common.hooks.base_google import GoogleBaseHook, get_field

    hook = GoogleBaseHook(gcp_conn_id=conn_id)
    endpoint, project = get_field(hook.extras, "storage_endpoint"), get_field(hook.extras, "project")
    keyed = any(get_field(hook.extras, f) for f in ("key_path", "keyfile_dict", "credential_config_file",
                                                    "key_secret_name"))
    if endpoint and not keyed:  # a local emulator: anonymous, as GCS emulators expect
        return GcpCredentials(None, project, endpoint)
    credentials, default_project = hook.get_credentials_and_project_id()
    return GcpCredentials(credentials, project or default_project, endpoint)
