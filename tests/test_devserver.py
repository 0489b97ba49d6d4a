"""The persistent OpenBao server behind `make up`: keys survive a restart."""

from __future__ import annotations

import stat

from keyrotation.backends.vault_transit import VaultTransitBackend
from keyrotation_dev.devserver import OpenBaoFileServer, free_port


def test_file_server_keeps_keys_across_restarts(tmp_path):
    port = free_port()
    with OpenBaoFileServer(tmp_path / "bao", port=port) as server:
        backend = VaultTransitBackend(server.client(), "persist")
        backend.create_key()
        wrapped = backend.wrap(b"s" * 32)
    init = tmp_path / "bao" / "init.json"
    assert stat.S_IMODE(init.stat().st_mode) == 0o600
    with OpenBaoFileServer(tmp_path / "bao", port=port) as server:
        assert VaultTransitBackend(server.client(), "persist").unwrap(wrapped) == b"s" * 32
