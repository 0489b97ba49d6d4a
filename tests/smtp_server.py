"""A real SMTP server on loopback (aiosmtpd, AUTH required), as the pytest fixture ``smtp_server``.

A test module uses it with ``pytest_plugins = ["smtp_server"]``; the fixture yields a :class:`SmtpServer` with
the host, the port, the login it accepts, every message it received and the Airflow connection that reaches it.
"""

from __future__ import annotations

import json
import secrets
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from keyrotation_dev.devserver import free_port


@dataclass(frozen=True)
class ReceivedMail:
    """One message as the server received it: the envelope, the bytes on the wire, the parsed message."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    login: str | None

    @property
    def message(self) -> EmailMessage:
        return BytesParser(policy=policy.default).parsebytes(self.raw)

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def text(self) -> str:
        """Everything a reader can see, decoded: the headers and every part's content (the bytes on the wire
        may be base64, where a search for a string finds nothing)."""
        message = self.message
        headers = "".join(f"{name}: {value}\n" for name, value in message.items())
        parts = [part.get_content() for part in message.walk() if not part.is_multipart()]
        return headers + "\n".join(str(content) for content in parts)

    def body(self, subtype: str = "html") -> str:
        """The decoded text of the message's ``text/<subtype>`` part."""
        part = self.message.get_body(preferencelist=(subtype,))
        assert part is not None, f"no text/{subtype} part in {self.subject!r}"
        return part.get_content()


@dataclass
class SmtpServer:
    host: str
    port: int
    login: str
    password: str
    messages: list[ReceivedMail] = field(default_factory=list)
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int, timeout: float = 30) -> list[ReceivedMail]:
        """The first ``count`` messages, once that many have arrived; fails after ``timeout`` seconds."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                pytest.fail(f"{len(self.messages)} of {count} mails arrived within {timeout} s")
            return list(self.messages[:count])

    def airflow_connection(self, from_email: str = "keyrotation@example.test") -> str:
        """An ``AIRFLOW_CONN_*`` value (JSON) for the smtp provider: plain SMTP with AUTH, no TLS."""
        return json.dumps({"conn_type": "smtp", "host": self.host, "port": self.port, "login": self.login,
                           "password": self.password,
                           "extra": {"disable_ssl": True, "disable_tls": True, "from_email": from_email,
                                     "timeout": 10, "retry_limit": 1}})

    # aiosmtpd's handler and authenticator hooks
    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's name
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        mail = ReceivedMail(envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.original_content), login)
        with self._arrived:
            self.messages.append(mail)
            self._arrived.notify_all()
        return "250 Message accepted for delivery"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login.decode(), auth_data.password.decode()) == (
            self.login, self.password)
        return AuthResult(success=ok, auth_data=auth_data if ok else None)


class _Controller(Controller):
    def factory(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # AUTH without TLS: on loopback, on purpose
            return super().factory()


@contextmanager
def running_smtp_server() -> Iterator[SmtpServer]:
    """An SMTP server on 127.0.0.1 (a free port) that requires the login it was given, while in the block."""
    server = SmtpServer("127.0.0.1", free_port(), "keyrotation", "SMTP-PASSWORD-" + secrets.token_hex(8))
    controller = _Controller(server, hostname=server.host, port=server.port, authenticator=server.authenticate,
                            auth_required=True, auth_require_tls=False)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


@pytest.fixture
def smtp_server():
    """An SMTP server for one test (:func:`running_smtp_server`)."""
    with running_smtp_server() as server:
        yield server
