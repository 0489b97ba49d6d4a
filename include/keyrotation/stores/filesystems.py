"""Where a dataset's bytes live: local paths, S3 through pyarrow and boto3, GCS through pyarrow and
google-cloud-storage, or a SQL database.

Credentials come in from the caller (an Airflow connection through the hooks, or a script), never
from config files. :class:`Storage` is what a runtime asks for a dataset's filesystem and, for
objects encrypted by S3 itself, its S3 client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from keyrotation.errors import PartitionError


def split_location(location: str) -> tuple[str, str]:
    """``(scheme, path)``: ``s3://bucket/prefix`` -> ``("s3", "bucket/prefix")``; a local path -> ``("file", abs)``."""
    if "://" not in location:
        return "file", str(Path(location).expanduser().resolve())
    parsed = urlparse(location)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if not path:
        raise PartitionError("*", f"dataset location {location!r} names no bucket or path")
    return parsed.scheme, path


@dataclass(frozen=True)
class AwsCredentials:
    """What an ``aws`` connection resolves to. ``endpoint_url`` reaches a local AWS-API server."""

    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    region_name: str | None = None
    endpoint_url: str | None = None

    def __repr__(self) -> str:  # never show the secret
        return f"AwsCredentials(region_name={self.region_name!r}, endpoint_url={self.endpoint_url!r})"

    def s3_filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {"region": self.region_name or "us-east-1"}
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key, session_token=self.session_token)
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
        return pafs.S3FileSystem(**kwargs)

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name=self.region_name or "us-east-1", endpoint_url=self.endpoint_url,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            aws_session_token=self.session_token)


@dataclass(frozen=True)
class GcpCredentials:
    """What a ``google_cloud_platform`` connection resolves to for GCS.

    ``credentials`` is a google-auth credentials object (None: anonymous, for a local emulator);
    ``storage_endpoint`` (e.g. ``http://127.0.0.1:9023``) reaches another GCS JSON API endpoint.
    """

    credentials: Any = None
    project: str | None = None
    storage_endpoint: str | None = None

    def __repr__(self) -> str:  # never show the credentials
        return f"GcpCredentials(project={self.project!r}, storage_endpoint={self.storage_endpoint!r})"

    def gcs_filesystem(self) -> pafs.GcsFileSystem:
        kwargs: dict[str, Any] = {}
        if self.storage_endpoint:
            url = urlparse(self.storage_endpoint)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
        if self.credentials is None:
            return pafs.GcsFileSystem(anonymous=True, **kwargs)
        import google.auth.transport.requests

        if not self.credentials.valid:
            self.credentials.refresh(google.auth.transport.requests.Request())
        expiry = self.credentials.expiry
        if expiry is not None and expiry.tzinfo is None:
            from datetime import UTC

            expiry = expiry.replace(tzinfo=UTC)
        return pafs.GcsFileSystem(access_token=self.credentials.token, credential_token_expiration=expiry,
                                  project_id=self.project, **kwargs)

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        options = {"api_endpoint": self.storage_endpoint} if self.storage_endpoint else None
        return storage.Client(project=self.project or "_", credentials=self.credentials or AnonymousCredentials(),
                              client_options=options)


class Storage:
    """Filesystems for dataset locations: local paths and pyarrow URIs as they are, S3 and GCS with
    credentials."""

    def __init__(self, aws: AwsCredentials | None = None, sql_url: str | None = None,
                 gcp: GcpCredentials | None = None) -> None:
        self.aws = aws
        self.gcp = gcp
        #: For sql_table datasets: the SQLAlchemy URL resolved from a connection (else the location is one).
        self.sql_url = sql_url

    def filesystem(self, location: str) -> tuple[pafs.FileSystem, str]:
        scheme, path = split_location(location)
        if scheme == "file":
            return pafs.LocalFileSystem(), path
        if scheme == "s3" and self.aws is not None:
            return self.aws.s3_filesystem(), path
        if scheme == "gs" and self.gcp is not None:
            return self.gcp.gcs_filesystem(), path
        try:
            return pafs.FileSystem.from_uri(location)
        except (ValueError, OSError) as exc:
            raise PartitionError("*", f"cannot open dataset location {location}: {exc}") from None

    def s3_client(self, location: str) -> Any:
        scheme, _ = split_location(location)
        if scheme != "s3":
            raise PartitionError("*", f"dataset location {location} is not an s3:// location")
        return (self.aws or AwsCredentials()).client("s3")

    def gcs_client(self, location: str) -> Any:
        """A google-cloud-storage client for a ``gs://`` location."""
        scheme, _ = split_location(location)
        if scheme != "gs":
            raise PartitionError("*", f"dataset location {location} is not a gs:// location")
        return (self.gcp or GcpCredentials()).client()
