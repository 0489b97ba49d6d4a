"""The hooks that turn an Airflow connection into a KMS client, and a key class's backend over it.

One hook per connection type, each the provider's own hook with the key rotation's additions (as the amazon
provider's ``SqsHook`` is its ``AwsBaseHook`` for one client): ``VaultTransitHook`` (``vault``,
:mod:`keyrotation_airflow.hooks.vault_transit`), ``AwsKmsHook`` (``aws``, :mod:`~keyrotation_airflow.hooks.aws_kms`)
and ``GcpKmsHook`` (``google_cloud_platform``, :mod:`~keyrotation_airflow.hooks.gcp_kms`). :data:`KMS_HOOKS` maps a
key class's ``backend:`` to its hook, and :func:`kms_hook` builds it on the key class's connection for a role.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, Any, ClassVar, Self

from keyrotation.errors import KmsUnreachable

if TYPE_CHECKING:
    from keyrotation.backends.base import KmsBackend
    from keyrotation.config import KeyClass


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


class KmsHookMixin:
    """
    What the KMS hooks add to their provider's hook: the key class's backend over the hook's client, an async
    readiness check for the trigger, and one error, :class:`~keyrotation.errors.KmsUnreachable`, naming what
    needed the KMS (``purpose``), the connection, where it points and the cause, when the set-up cannot reach it.
    """

    conn_name_attr: ClassVar[str]
    #: What needs the connection, for the error when the KMS cannot be reached.
    purpose: str = "the KMS"
    _polled_backend: KmsBackend | None = None

    def get_conn(self) -> Any:
        """The KMS's own client (the provider hook's, with :class:`KmsUnreachable` for a KMS out of reach)."""
        raise NotImplementedError

    @classmethod
    def for_key_class(cls, kc: KeyClass, role: str) -> Self:
        """This hook on the key class's connection for ``role`` (``connections.<role>``, else ``conn_id``), with
        the key class's options for the connection."""
        raise NotImplementedError

    @staticmethod
    def key_class_purpose(kc: KeyClass) -> str:
        return f"key class {kc.name!r} ({kc.backend})"

    def _unreachable(self, where: str, exc: BaseException) -> KmsUnreachable:
        conn_id = getattr(self, self.conn_name_attr)
        return KmsUnreachable(f"KMS unreachable: {self.purpose} through connection {conn_id!r} at {where}: "
                              f"{_root_cause(exc)}")

    def get_backend(self, kc: KeyClass) -> KmsBackend:
        """The backend of key class ``kc`` over this hook's client.

        :raises KmsUnreachable: the set-up needed the KMS (or the cloud's credentials endpoint) and could not
            reach it.
        """
        from keyrotation.backends.registry import open_backend

        return open_backend(kc, self.get_conn())

    async def aversion_state(self, kc: KeyClass, version: int) -> tuple[bool, str]:
        """Whether ``version`` of the key class's master key is usable yet, and its state in words, without
        blocking the event loop: here the backend's own check
        (:meth:`~keyrotation.backends.base.KmsBackend.is_version_usable`) in a thread, over the backend opened
        on the first call and kept for the hook's life."""
        if self._polled_backend is None:
            self._polled_backend = await asyncio.to_thread(self.get_backend, kc)
        ready = await asyncio.to_thread(self._polled_backend.is_version_usable, version)
        return ready, "usable" if ready else "not usable"


#: A key class's ``backend:`` -> the hook of its connection type, imported on first use (each pulls in its
#: provider, and the google one takes a while).
KMS_HOOKS: dict[str, str] = {
    "vault_transit": "keyrotation_airflow.hooks.vault_transit:VaultTransitHook",
    "aws_kms": "keyrotation_airflow.hooks.aws_kms:AwsKmsHook",
    "gcp_kms": "keyrotation_airflow.hooks.gcp_kms:GcpKmsHook",
}


def kms_hook_class(backend: str) -> type[KmsHookMixin]:
    module, _, attr = KMS_HOOKS[backend].partition(":")
    return getattr(importlib.import_module(module), attr)


def kms_hook(kc: KeyClass, role: str) -> KmsHookMixin:
    """The hook of key class ``kc``'s KMS, on its connection for ``role`` (rotate, reencrypt, retire, report), so
    credentials come from Airflow connections or a secrets backend, never from config files, and each role's
    credentials can do only its part."""
    return kms_hook_class(kc.backend).for_key_class(kc, role)
