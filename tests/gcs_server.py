"""GCS on loopback for the tests and the demo: ``gcp-storage-emulator`` (the JSON API, in memory) with
what it lacks for customer-managed keys added, as GCS documents it:

* an upload with ``kmsKeyName`` (a CryptoKey) stores, as the object's ``kmsKeyName``, the
  CryptoKeyVersion that is the key's primary at that moment, which GCS reports;
* ``objects.rewrite`` takes ``destinationKmsKeyName`` the same way, applies the destination resource
  sent in the body over the source's metadata, and honours ``ifGenerationMatch`` and
  ``ifSourceGenerationMatch`` (412 when one does not hold); the emulator ignores all three;
* reading an object whose key version is not enabled fails, as GCS fails when it cannot unwrap.

The primary versions and version states come from the Cloud KMS test server in the same process
(``tests/gcp_kms_server.py``), through the two callables given to :class:`GcsTestServer`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.exceptions import Conflict, NotFound
from gcp_storage_emulator.handlers import objects

from keyrotation_dev.devserver import free_port

logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)

PrimaryOf = Callable[[str], "str | None"]
VersionEnabled = Callable[[str], bool]
_WRITABLE = ("cacheControl", "contentDisposition", "contentEncoding", "contentLanguage", "contentType",
             "metadata", "storageClass", "customTime")
_patch_lock = threading.Lock()
_servers: list[GcsTestServer] = []


def _error(response: Any, status: HTTPStatus, reason: str, message: str) -> None:
    response.status = status
    response.json({"error": {"code": status.value, "message": message,
                             "errors": [{"domain": "global", "reason": reason, "message": message}]}})


def _server_for(request: Any) -> GcsTestServer:
    port = request._server_address[1]
    for server in _servers:
        if server.port == port:
            return server
    raise RuntimeError(f"no GCS test server on port {port}")


class _KmsStorage:
    """The emulator's storage, with each object written under a CryptoKey given its primary version."""

    def __init__(self, storage: Any, kms_key_name: str | None, server: GcsTestServer) -> None:
        self._storage = storage
        self._kms_key_name = kms_key_name
        self._server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def _stamp(self, obj: dict) -> None:
        if self._kms_key_name:
            obj["kmsKeyName"] = self._server.resolve(self._kms_key_name)

    def create_file(self, bucket_name: str, file_name: str, content: bytes, file_obj: dict, file_id: Any = None
                    ) -> Any:
        if file_id is None:
            self._stamp(file_obj)
        return self._storage.create_file(bucket_name, file_name, content, file_obj, file_id)

    def create_resumable_upload(self, bucket_name: str, file_name: str, file_obj: dict) -> Any:
        self._stamp(file_obj)
        return self._storage.create_resumable_upload(bucket_name, file_name, file_obj)


def _insert(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    server = _server_for(request)
    name = (request.query.get("kmsKeyName") or [None])[0]
    if name is None and isinstance(request.data, dict):
        name = (request.data.get("meta") or {}).get("kmsKeyName")
    try:
        if name:
            server.resolve(name)
    except ValueError as exc:
        return _error(response, HTTPStatus.BAD_REQUEST, "invalid", str(exc))
    return _ORIGINAL["insert"](request, response, _KmsStorage(storage, name, server), *args, **kwargs)


def _precondition(query: dict, name: str, current: str | None) -> bool:
    wanted = (query.get(name) or [None])[0]
    if wanted is None:
        return True
    return (current or "0") == str(wanted)


def _rewrite(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    server = _server_for(request)
    params, query = request.params, request.query
    try:
        source = storage.get_file_obj(params["bucket_name"], params["object_id"])
    except NotFound:
        return _error(response, HTTPStatus.NOT_FOUND, "notFound", "No such object: "
                      f"{params['bucket_name']}/{params['object_id']}")
    try:
        dest = storage.get_file_obj(params["dest_bucket_name"], params["dest_object_id"])
    except NotFound:
        dest = None
    if not (_precondition(query, "ifSourceGenerationMatch", source.get("generation"))
            and _precondition(query, "ifGenerationMatch", (dest or {}).get("generation"))):
        return _error(response, HTTPStatus.PRECONDITION_FAILED, "conditionNotMet",
                      "At least one of the pre-conditions you specified did not hold.")
    if not server.readable(source):
        return server.refuse_unreadable(response, source)
    body = request.data if isinstance(request.data, dict) else {}
    metadata = {**{k: source[k] for k in _WRITABLE if k in source}, **{k: body[k] for k in _WRITABLE if k in body}}
    dest_key = (query.get("destinationKmsKeyName") or [None])[0]
    try:
        kms = server.resolve(dest_key) if dest_key else None
    except ValueError as exc:
        return _error(response, HTTPStatus.BAD_REQUEST, "invalid", str(exc))
    resource = objects._make_object_resource(request.base_url, params["dest_bucket_name"],
                                             params["dest_object_id"], metadata.get("contentType"), source["size"],
                                             metadata)
    content = storage.get_file(params["bucket_name"], params["object_id"])
    try:
        resource = objects._checksums(content, resource)
    except Conflict as exc:
        return _error(response, HTTPStatus.BAD_REQUEST, "invalid", str(exc))
    if kms:
        resource["kmsKeyName"] = kms
    storage.create_file(params["dest_bucket_name"], params["dest_object_id"], content, resource)
    if kms:
        server.cmek_rewrites += 1
    size = str(resource["size"])
    response.json({"kind": "storage#rewriteResponse", "totalBytesRewritten": size, "objectSize": size, "done": True,
                   "resource": resource})


def _download(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    server = _server_for(request)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        obj = None
    if obj is not None and not server.readable(obj):
        return server.refuse_unreadable(response, obj)
    return _ORIGINAL["download"](request, response, storage, *args, **kwargs)


_ORIGINAL = {"insert": objects.insert, "rewrite": objects.rewrite, "download": objects.download}
_REPLACEMENT = {objects.insert: _insert, objects.rewrite: _rewrite, objects.download: _download}


def _patch_handlers() -> None:
    with _patch_lock:
        for _pattern, methods in emulator.HANDLERS:
            for method, handler in list(methods.items()):
                if handler in _REPLACEMENT:
                    methods[method] = _REPLACEMENT[handler]


class GcsTestServer:
    """The GCS JSON API on ``http://127.0.0.1:PORT``, in memory, with CMEK as described above."""

    def __init__(self, primary_of: PrimaryOf, version_enabled: VersionEnabled, port: int | None = None) -> None:
        self.port = port or free_port()
        self.primary_of = primary_of
        self.version_enabled = version_enabled
        #: Rewrites that named a destination key (pyarrow's moves are rewrites too, without one).
        self.cmek_rewrites = 0
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def resolve(self, kms_key_name: str) -> str:
        """The CryptoKeyVersion GCS records for an object written under ``kms_key_name``."""
        if "/cryptoKeyVersions/" in kms_key_name:
            raise ValueError(f"kmsKeyName must name a CryptoKey, not a version: {kms_key_name}")
        primary = self.primary_of(kms_key_name)
        if primary is None:
            raise ValueError(f"Cloud KMS key {kms_key_name} does not exist or has no enabled primary version")
        if not self.version_enabled(primary):
            raise ValueError(f"the primary version of Cloud KMS key {kms_key_name} is not enabled")
        return primary

    def readable(self, obj: dict) -> bool:
        name = obj.get("kmsKeyName")
        return not name or self.version_enabled(name)

    def refuse_unreadable(self, response: Any, obj: dict) -> None:
        _error(response, HTTPStatus.BAD_REQUEST, "invalid",
               f"The Cloud KMS key version {obj['kmsKeyName']} that protects this object is not enabled.")

    def start(self) -> GcsTestServer:
        _patch_handlers()
        _servers.append(self)
        self._server = emulator.create_server("127.0.0.1", self.port, in_memory=True)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self in _servers:
            _servers.remove(self)

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="keyrotation-test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(name)

    def __enter__(self) -> GcsTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

