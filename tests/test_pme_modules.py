"""Module-level re-encryption of PME files: every variant pyarrow writes, re-encrypted under new data keys,
read back by stock pyarrow (page checksums verified) equal to the table the test wrote; old keys refused;
damage refused; the cases the module path cannot take refused with their reason."""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotation.formats.parquet_pme import double_wrapped_material, key_material_path, unwrap_data_key
from keyrotation.formats.pme_modules import (
    ModuleKeys,
    ModuleReencryptionError,
    ModuleReencryptionUnavailable,
    file_key_metadata,
    reencrypt_bytes,
    reencrypt_file,
)
from keyrotation.formats.thrift_compact import decode_struct

MASTER_KEYS = {name: os.urandom(16) for name in ("footer", "col_a", "col_b")}
LOCAL = pafs.LocalFileSystem()


class MemoryKms(pe.KmsClient):
    """The test's KMS: master keys in memory, wrapping by AES-GCM."""

    def __init__(self, _config=None) -> None:
        super().__init__()

    def wrap_key(self, key_bytes, master_key_identifier):
        nonce = os.urandom(12)
        return base64.b64encode(nonce + AESGCM(MASTER_KEYS[master_key_identifier]).encrypt(nonce, key_bytes, None)
                                ).decode()

    def unwrap_key(self, wrapped_key, master_key_identifier):
        blob = base64.b64decode(wrapped_key)
        return AESGCM(MASTER_KEYS[master_key_identifier]).decrypt(blob[:12], blob[12:], None)


FACTORY = pe.CryptoFactory(MemoryKms)
KMS = pe.KmsConnectionConfig()
#: The two page walks: the C one (``_pme_pages.c``, built by ``make install``) and the Python one, the reference.
WALKS = ["native", "python"]


@pytest.fixture
def walk(request, monkeypatch):
    """The page walk a test runs on (parametrize ``walk`` with WALKS)."""
    import keyrotation.formats.pme_modules as pm

    if request.param == "native":
        assert pm.NATIVE, "the C page walk is not built: make install builds it (scripts/build_native.py)"
    monkeypatch.setattr(pm, "NATIVE", request.param == "native")
    return request.param


def _table(rows: int = 3000, nested: bool = False) -> pa.Table:
    columns = {
        "a": pa.array(range(rows), pa.int64()),
        "b": pa.array([f"name-{i % 97}" for i in range(rows)]),
        "c": pa.array([i * 0.5 for i in range(rows)]),
    }
    if nested:
        columns["s"] = pa.array([{"x": i, "y": f"y{i % 7}"} for i in range(rows)])
        columns["l"] = pa.array([[i, i + 1] if i % 3 else [] for i in range(rows)], pa.list_(pa.int32()))
    return pa.table(columns)


# name: (EncryptionConfiguration options, pq.write_table options, nested schema)
VARIANTS = {
    "gcm column keys external double": ({}, {}, False),
    "gcm column keys internal double": ({"internal_key_material": True}, {}, False),
    "gcm single wrapping external": ({"double_wrapping": False}, {}, False),
    "gcm single wrapping internal": ({"double_wrapping": False, "internal_key_material": True}, {}, False),
    "gcm plaintext footer": ({"plaintext_footer": True}, {}, False),
    "gcm plaintext footer internal": ({"plaintext_footer": True, "internal_key_material": True}, {}, False),
    "gcm uniform": ({"uniform_encryption": True}, {}, False),
    "gcm no dictionary": ({}, {"use_dictionary": False}, False),
    "gcm data page v2": ({}, {"data_page_version": "2.0"}, False),
    "gcm page index": ({}, {"write_page_index": True}, False),
    "gcm page crc": ({}, {"write_page_checksum": True}, False),
    "gcm everything": ({}, {"write_page_index": True, "write_page_checksum": True, "data_page_version": "2.0",
                            "data_page_size": 2048}, True),
    "gcm nested uniform": ({"uniform_encryption": True}, {"write_page_index": True}, True),
    "gcm nested column keys": ({"column_keys": {"col_a": ["s.x", "l.list.element"], "col_b": ["b"]}},
                               {"write_page_checksum": True}, True),
    "gcm plaintext footer page index crc": ({"plaintext_footer": True},
                                            {"write_page_index": True, "write_page_checksum": True}, True),
    "ctr page crc": ({"encryption_algorithm": "AES_GCM_CTR_V1"}, {"write_page_checksum": True}, False),
    "ctr plaintext footer crc index": ({"encryption_algorithm": "AES_GCM_CTR_V1", "plaintext_footer": True},
                                       {"write_page_checksum": True, "write_page_index": True,
                                        "data_page_version": "2.0"}, True),
    "ctr uniform internal crc": ({"encryption_algorithm": "AES_GCM_CTR_V1", "uniform_encryption": True,
                                  "internal_key_material": True}, {"write_page_checksum": True}, True),
}


def _write(path: Path, table: pa.Table, config: dict, options: dict) -> None:
    settings = {"footer_key": "footer", "column_keys": {"col_a": ["a"], "col_b": ["b"]},
                "internal_key_material": False, **config}
    if settings.get("uniform_encryption"):
        settings.pop("column_keys")
    properties = FACTORY.file_encryption_properties(KMS, pe.EncryptionConfiguration(**settings), str(path), LOCAL)
    pq.write_table(table, path, encryption_properties=properties, **options)


def _material(path: Path, key_metadata: bytes) -> dict:
    """The PKMT1 key material a key metadata names: itself (internal) or its entry in the key material file."""
    metadata = json.loads(key_metadata)
    if metadata["internalStorage"]:
        return metadata
    return json.loads(json.loads(Path(key_material_path(str(path))).read_text())[metadata["keyReference"]])


def _unwrap(material: dict) -> bytes:
    return unwrap_data_key(material, lambda wrapped: MemoryKms().unwrap_key(wrapped, material["masterKeyID"]))


def _old_keys(path: Path) -> ModuleKeys:
    data = path.read_bytes()
    footer = _unwrap(_material(path, file_key_metadata(data).footer))
    columns = {c: _unwrap(_material(path, m)) for c, m in file_key_metadata(data, footer).columns.items()}
    return ModuleKeys(footer, columns)


def _new_keys(src: Path, dst: Path, old: ModuleKeys) -> ModuleKeys:
    """New data keys for each of ``old``'s, double-wrapped under one new KEK per master key, stored as the source
    stored its keys (internal: in new key metadata; external: a new key material file for ``dst``)."""
    data = src.read_bytes()
    footer_metadata = file_key_metadata(data).footer
    column_metadata = file_key_metadata(data, old.footer).columns
    keks: dict[str, tuple[bytes, bytes, str]] = {}
    external: dict[str, str] = {}

    def new(key_metadata: bytes, old_key: bytes, footer: bool) -> tuple[bytes, bytes | None]:
        material = _material(src, key_metadata)
        master = material["masterKeyID"]
        if master not in keks:
            kek = os.urandom(16)
            keks[master] = (kek, os.urandom(16), MemoryKms().wrap_key(kek, master))
        dek = os.urandom(len(old_key))
        internal = json.loads(key_metadata)["internalStorage"]
        entry = double_wrapped_material(dek, *keks[master], master, footer, internal=internal)
        if internal:
            return dek, json.dumps(entry, separators=(",", ":")).encode()
        external[json.loads(key_metadata)["keyReference"]] = json.dumps(entry, separators=(",", ":"))
        return dek, None

    footer, footer_km = new(footer_metadata, old.footer, True)
    columns, columns_km = {}, {}
    for column, metadata in column_metadata.items():
        columns[column], km = new(metadata, old.columns[column], False)
        if km is not None:
            columns_km[column] = km
    if external:
        Path(key_material_path(str(dst))).write_text(json.dumps(external, separators=(",", ":")))
    return ModuleKeys(footer, columns, footer_km, columns_km)


def _read(path: Path, **kwargs) -> pa.Table:
    # a fresh factory: pyarrow caches KEKs per factory
    properties = pe.CryptoFactory(MemoryKms).file_decryption_properties(
        KMS, pe.DecryptionConfiguration(), str(path), LOCAL)
    return pq.read_table(path, decryption_properties=properties, page_checksum_verification=True, **kwargs)


@pytest.mark.parametrize("walk", WALKS, indirect=True)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_reencrypted_reads_back_equal(variant, walk, tmp_path):
    config, options, nested = VARIANTS[variant]
    table = _table(nested=nested)
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    _write(src, table, config, options)
    old = _old_keys(src)
    new = _new_keys(src, dst, old)
    data, result = reencrypt_bytes(src.read_bytes(), old, new)
    dst.write_bytes(data)
    if not config.get("internal_key_material"):  # the key metadata is unchanged: so is every size
        assert len(data) == src.stat().st_size
    assert result.modules > 0
    assert result.algorithm == config.get("encryption_algorithm", "AES_GCM_V1")
    assert result.plaintext_footer == config.get("plaintext_footer", False)
    assert (result.crc_pages > 0) == options.get("write_page_checksum", False)
    back = _read(dst)
    assert back.equals(table)
    # the old keys do not open the new file: neither here nor, through the old key material, in pyarrow
    with pytest.raises(ModuleReencryptionError) as refused:
        reencrypt_bytes(data, old, ModuleKeys(os.urandom(16), {c: os.urandom(16) for c in old.columns}))
    assert str(refused.value) == ("plaintext footer: signature does not verify under the old footer key"
                                  if config.get("plaintext_footer") else
                                  "footer: does not authenticate under the old footer key")
    if not config.get("internal_key_material"):
        Path(key_material_path(str(dst))).write_bytes(Path(key_material_path(str(src))).read_bytes())
        with pytest.raises((OSError, pa.ArrowInvalid)) as old_material:
            _read(dst)
        assert str(old_material.value).endswith("Parquet crypto signature verification failed"
                                                if config.get("plaintext_footer") else "Failed decryption finalization")


def _written(tmp_path: Path, config: dict | None = None, options: dict | None = None, rows: int = 3000,
             nested: bool = False) -> tuple[pa.Table, Path, Path, ModuleKeys, ModuleKeys]:
    table = _table(rows, nested)
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    _write(src, table, config or {}, options or {})
    old = _old_keys(src)
    return table, src, dst, old, _new_keys(src, dst, old)


def _first_data_page(path: Path, column: str) -> tuple[int, int]:
    """The [start, end) of the ciphertext of ``column``'s first data page (after its nonce, before any tag)."""
    properties = pe.CryptoFactory(MemoryKms).file_decryption_properties(
        KMS, pe.DecryptionConfiguration(), str(path), LOCAL)
    row_group = pq.ParquetFile(path, decryption_properties=properties).metadata.row_group(0)
    chunk = next(row_group.column(i) for i in range(row_group.num_columns)
                 if row_group.column(i).path_in_schema == column)
    data = path.read_bytes()
    header_length = struct.unpack_from("<I", data, chunk.data_page_offset)[0]
    page = chunk.data_page_offset + 4 + header_length
    return page + 4 + 12, page + 4 + struct.unpack_from("<I", data, page)[0] - 16


@pytest.mark.parametrize("walk", WALKS, indirect=True)
def test_file_to_file_streams_and_reads_back(walk, tmp_path):
    table, src, dst, old, new = _written(tmp_path, options={"write_page_index": True, "write_page_checksum": True},
                                         rows=20_000, nested=True)
    result = reencrypt_file(str(src), str(dst), LOCAL, old, new)
    assert result.bytes == src.stat().st_size == dst.stat().st_size
    assert _read(dst).equals(table)
    # the same keys give the same plaintexts in memory: only nonces (and so ciphertexts and CRCs) differ
    in_memory, _ = reencrypt_bytes(src.read_bytes(), old, new)
    assert len(in_memory) == dst.stat().st_size and in_memory != dst.read_bytes()


def test_aad_prefix_stored_and_supplied(tmp_path):
    table = _table()
    for store in (True, False):
        src, dst = tmp_path / f"src-{store}.parquet", tmp_path / f"dst-{store}.parquet"
        old_key, new_key = os.urandom(32), os.urandom(32)
        pq.write_table(table, src, write_page_checksum=True, encryption_properties=pe.create_encryption_properties(
            old_key, aad_prefix=b"dataset-7", store_aad_prefix=store))
        supplied = None if store else b"dataset-7"
        if not store:
            with pytest.raises(ModuleReencryptionError) as missing:
                reencrypt_bytes(src.read_bytes(), ModuleKeys(old_key), ModuleKeys(new_key))
            assert str(missing.value) == "the file's AAD prefix is not stored in it: supply it"
        with pytest.raises(ModuleReencryptionError) as wrong:
            reencrypt_bytes(src.read_bytes(), ModuleKeys(old_key), ModuleKeys(new_key), aad_prefix=b"dataset-8")
        assert str(wrong.value) == ("the AAD prefix supplied differs from the one the file stores" if store else
                                    "footer: does not authenticate under the old footer key")
        data, _ = reencrypt_bytes(src.read_bytes(), ModuleKeys(old_key), ModuleKeys(new_key), aad_prefix=supplied)
        dst.write_bytes(data)
        properties = pe.create_decryption_properties(new_key, aad_prefix=supplied)
        back = pq.read_table(dst, page_checksum_verification=True, decryption_properties=properties)
        assert back.equals(table)
        with pytest.raises(OSError, match="Failed decryption finalization$"):
            pq.read_table(dst, decryption_properties=pe.create_decryption_properties(old_key, aad_prefix=supplied))


@pytest.mark.parametrize("walk", WALKS, indirect=True)
@pytest.mark.parametrize("config", [{}, {"plaintext_footer": True}], ids=["encrypted footer", "plaintext footer"])
def test_flipped_bit_refused(config, walk, tmp_path):
    _, src, _, old, new = _written(tmp_path, config)
    data = bytearray(src.read_bytes())
    start, end = _first_data_page(src, "a")
    page = bytearray(data)
    page[(start + end) // 2] ^= 0x01
    with pytest.raises(ModuleReencryptionError) as refused:
        reencrypt_bytes(page, old, new)
    assert str(refused.value) == "column a: page: does not authenticate under the old column a key"
    footer = bytearray(data)
    footer[len(data) - 8 - 40] ^= 0x01  # in the footer module's ciphertext, or in the signed plaintext footer
    with pytest.raises(ModuleReencryptionError) as refused:
        reencrypt_bytes(footer, old, new)
    assert str(refused.value) == ("plaintext footer: signature does not verify under the old footer key"
                                  if config else "footer: does not authenticate under the old footer key")


def test_ctr_without_page_crcs_refused_before_writing(tmp_path):
    _, src, dst, old, new = _written(tmp_path, {"encryption_algorithm": "AES_GCM_CTR_V1"})
    with pytest.raises(ModuleReencryptionUnavailable) as refused:
        reencrypt_file(str(src), str(dst), LOCAL, old, new)
    assert refused.value.reason == (
        "AES_GCM_CTR_V1 without page CRCs (column a): its pages are not authenticated, so neither a damaged source "
        "page nor a wrong new one could be detected; refused")
    assert not dst.exists()


def test_ctr_damaged_page_refused_by_its_crc(tmp_path):
    _, src, _, old, new = _written(tmp_path, {"encryption_algorithm": "AES_GCM_CTR_V1"}, {"write_page_checksum": True})
    data = bytearray(src.read_bytes())
    start, end = _first_data_page(src, "a")
    data[(start + end) // 2] ^= 0x01
    with pytest.raises(ModuleReencryptionError) as refused:
        reencrypt_bytes(data, old, new)
    assert str(refused.value) == "column a: a page does not match its CRC"


@pytest.mark.parametrize("walk", WALKS, indirect=True)
def test_crc_that_does_not_fit_takes_another_nonce(walk, tmp_path):
    # about 1 page CRC in 16 is a 4-byte varint, and a new CRC fits it with a chance of 1 in 16: with 300 pages
    # a file needs no extra nonce with a chance of 4e-9; one in 2**18 is a 2-byte varint, which 1 GiB of nonces for
    # a 2 KiB page fits 7 times in 8 (so this test fails once in 7,000 runs)
    table = pa.table({"a": pa.array(range(80_000), pa.int64())})
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    _write(src, table, {"column_keys": {"col_a": ["a"]}},
           {"write_page_checksum": True, "data_page_size": 2048, "write_batch_size": 256, "use_dictionary": False})
    old = _old_keys(src)
    new = _new_keys(src, dst, old)
    data, result = reencrypt_bytes(src.read_bytes(), old, new)
    assert result.crc_pages >= 300 and result.crc_retries > 0
    dst.write_bytes(data)
    assert _read(dst).equals(table)
    with pytest.raises(ModuleReencryptionUnavailable) as refused:
        reencrypt_bytes(src.read_bytes(), old, new, crc_budget=0)
    assert refused.value.reason == \
        "column a: a page's new CRC does not fit the varint its header has for it after 1 nonce(s)"


def test_wrong_crc_is_seen_by_the_reader(tmp_path, monkeypatch):
    """The read-back check has teeth: pages written with a wrong CRC fail pyarrow's checksum verification (the
    Python walk's CRCs are the ones a test can make wrong)."""
    import keyrotation.formats.pme_modules as pm

    monkeypatch.setattr(pm, "NATIVE", False)
    table, src, dst, old, new = _written(tmp_path, options={"write_page_checksum": True})
    monkeypatch.setattr(pm.zlib, "crc32", lambda _data: 5)
    data, _ = reencrypt_bytes(src.read_bytes(), old, new)
    dst.write_bytes(data)
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        _read(dst)


def test_new_keys_must_differ_and_exist(tmp_path):
    _, src, _, old, new = _written(tmp_path)
    with pytest.raises(ModuleReencryptionError) as same:
        reencrypt_bytes(src.read_bytes(), old, ModuleKeys(old.footer, new.columns))
    assert str(same.value) == "a new data key equals an old one: re-encryption needs new keys"
    with pytest.raises(ModuleReencryptionError) as missing:
        reencrypt_bytes(src.read_bytes(), old, ModuleKeys(new.footer, {"a": new.columns["a"]}))
    assert str(missing.value) == "no new key given for column b"
    assert "redacted" in repr(old) and old.footer.hex() not in repr(old)


def test_thrift_codec_round_trips_and_replaces(tmp_path):
    from keyrotation.formats.thrift_compact import BINARY, I32, I64, Struct, varint

    _, src, _, old, _ = _written(tmp_path, options={"write_page_index": True}, nested=True)
    data = src.read_bytes()
    length = struct.unpack("<I", data[-8:-4])[0]
    region = data[-8 - length : -8]
    crypto, end = decode_struct(region)
    assert crypto.encode() == region[:end]
    module = region[end:]
    plain = AESGCM(old.footer).decrypt(module[4:16], module[16:], crypto[1][1][1] + crypto[1][1][2] + b"\0"
                                       if 1 in crypto[1][1] else crypto[1][1][2] + b"\0")
    metadata, used = decode_struct(plain)
    assert used == len(plain) and metadata.encode() == plain
    # an unknown field (id 99, as a newer writer might add) survives a change to another field
    with_unknown = plain[:-1] + bytes([I64]) + varint(99 << 1) + b"\x2a" + b"\x00"
    changed, _ = decode_struct(with_unknown)
    assert changed.encode() == with_unknown
    changed.set(6, b"another writer", BINARY)
    again, _ = decode_struct(changed.encode())
    assert again[6] == b"another writer" and again[99] == 21
    assert [rg.encode() for rg in again[4].items] == [rg.encode() for rg in metadata[4].items]
    # a nested change re-encodes its parents; non-minimal varints are kept as given
    first: Struct = again[4].items[0]
    first.set(2, first[2] + 1, I64)
    first.set_raw(3, I32, b"\x82\x80\x00")
    assert "another writer" not in repr(again) + repr(again.fields[6]) + repr(again[4])
    third, _ = decode_struct(again.encode())
    assert third[4].items[0][2] == metadata[4].items[0][2] + 1 and third[4].items[0][3] == 1
    assert third[4].items[0].fields[3].raw == b"\x82\x80\x00"
    # lazily decoded (as page headers are): nested values decoded when asked for, the same bytes re-encoded
    lazy, _ = decode_struct(plain, lazy=True)
    assert lazy.encode() == plain and lazy[4].items[0].encode() == metadata[4].items[0].encode()
    assert lazy.to_dict() == metadata.to_dict()


def _page_headers(monkeypatch, tmp_path) -> list[bytes]:
    """The plaintext of every page header of every variant's file, as re-encryption reads them."""
    import keyrotation.formats.pme_modules as pm

    headers: list[bytes] = []
    original = pm.page_header

    def recorded(data: bytes):
        headers.append(bytes(data))
        return original(data)

    monkeypatch.setattr(pm, "page_header", recorded)
    monkeypatch.setattr(pm, "NATIVE", False)  # every header through the Python walk's page_header
    for i, (config, options, nested) in enumerate(VARIANTS.values()):
        src, dst = tmp_path / f"src{i}.parquet", tmp_path / f"dst{i}.parquet"
        _write(src, _table(nested=nested), config, options)
        old = _old_keys(src)
        reencrypt_bytes(src.read_bytes(), old, _new_keys(src, dst, old))
    monkeypatch.setattr(pm, "page_header", original)
    monkeypatch.undo()
    return headers


def _generic_page_header(data: bytes):
    """What the generic codec says of a page header: (type, size, crc, crc's raw bytes, end), or the error."""
    from keyrotation.formats.thrift_compact import ThriftError

    try:
        header, end = decode_struct(data, lazy=True)
    except ThriftError:
        return ThriftError
    crc = header.fields.get(4)
    return header.get(1), header.get(3), header.get(4), None if crc is None else crc.raw, end


def test_page_header_fast_path_matches_the_generic_codec(monkeypatch, tmp_path):
    """The page header fast path (no Struct built, the new CRC patched over the old one's varint) reads every page
    header of every variant as the generic codec decodes it, and patches it byte for byte as the codec re-encodes
    it; damaged headers are refused where the codec refuses them."""
    import random

    from keyrotation.formats import _pme_pages
    from keyrotation.formats.thrift_compact import I32, ThriftError, padded_varint, page_header, zigzag

    headers = _page_headers(monkeypatch, tmp_path)
    assert len(headers) > 50 and any(page_header(h)[3] >= 0 for h in headers)
    for data in headers:
        page_type, size, crc, crc_at, crc_size, end = page_header(data)
        raw = None if crc_at < 0 else data[crc_at:crc_at + crc_size]
        assert _generic_page_header(data) == (page_type, size, crc, raw, end) and end == len(data)
        assert _pme_pages.page_header(data) == (page_type, size, crc, crc_at, crc_size, end)
        if crc_at >= 0:
            for value in (0, -1, 2**31 - 1, -(2**31)):
                raw = padded_varint(zigzag(value, 32), crc_size)
                if raw is None:
                    continue
                header, _ = decode_struct(data, lazy=True)
                header.set_raw(4, I32, raw)
                assert data[:crc_at] + raw + data[crc_at + crc_size:] == header.encode()
    rng = random.Random(21)
    for _ in range(3000):
        damaged = bytearray(rng.choice(headers))
        if rng.random() < 0.3:
            del damaged[rng.randrange(len(damaged)):]
        else:
            for _ in range(rng.choice([1, 2, 4])):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        data = bytes(damaged)
        generic = _generic_page_header(data)
        native = _pme_pages.page_header(data)
        if native is not None:  # what the C walk reads, it reads as the Python walk does (it hands over the rest)
            assert native == page_header(data)
        try:
            fast = page_header(data)
        except ThriftError:
            continue  # refused; where the codec accepts it, only for what the fast path refuses besides:
            # a field given twice or a field 1, 3 or 4 not an integer (checked below for what it accepts)
        assert generic is not ThriftError
        page_type, size, crc, crc_at, crc_size, end = fast
        assert generic == (page_type, size, crc, None if crc_at < 0 else data[crc_at:crc_at + crc_size], end)


def test_lazy_decoding_and_skipping_accept_and_refuse_as_decoding_does(tmp_path):
    """A footer decoded lazily (every nested value, or below its column chunks) reads as decoded whole; damaged
    footers are refused by the skipping the lazy decoding does exactly where decoding them whole refuses them."""
    import random

    from keyrotation.formats.parquet_footer import decoded_footer_facts
    from keyrotation.formats.thrift_compact import ThriftError

    _, src, _, old, _ = _written(tmp_path, options={"write_page_index": True, "write_page_checksum": True},
                                 nested=True)
    data = src.read_bytes()
    length = struct.unpack("<I", data[-8:-4])[0]
    region = data[-8 - length : -8]
    crypto, end = decode_struct(region)
    module = region[end:]
    params = crypto[1][1]
    plain = AESGCM(old.footer).decrypt(module[4:16], module[16:], params.get(1, b"") + params[2] + b"\0")
    whole, _ = decode_struct(plain)
    for eager in (0, 1, 2, 5):
        lazy, used = decode_struct(plain, lazy=True, eager=eager)
        assert used == len(plain) and lazy.encode() == plain and lazy.to_dict() == whole.to_dict()
    # a Struct reads as the dict it decodes to
    lazy, _ = decode_struct(plain, lazy=True, eager=2)
    assert decoded_footer_facts("f", b"PARE", crypto, lazy) == \
        decoded_footer_facts("f", b"PARE", crypto.to_dict(), whole.to_dict())
    rng = random.Random(21)
    refused = 0
    for _ in range(1500):
        damaged = bytearray(plain)
        for _ in range(rng.choice([1, 2, 8])):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        outcomes = []
        for lazily in (False, True):
            try:
                outcomes.append(decode_struct(bytes(damaged), lazy=lazily)[1])
            except ThriftError:
                outcomes.append(ThriftError)
        assert outcomes[0] == outcomes[1]
        refused += outcomes[0] is ThriftError
    assert refused > 100


def test_work_buffers_kept_between_files_hold_no_plaintext(tmp_path):
    """The buffers a thread keeps for its next file are zeroed where they held decrypted modules."""
    import keyrotation.formats.pme_modules as pm

    table = pa.table({"a": pa.array(range(3000), pa.int64()),
                      "b": pa.array([f"secret-{i:05d}" for i in range(3000)])})
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    _write(src, table, {}, {"compression": "none", "use_dictionary": False})
    old = _old_keys(src)
    new = _new_keys(src, dst, old)
    reencrypt_bytes(src.read_bytes(), old, new)
    reencrypt_file(str(src), str(dst), LOCAL, old, new)
    assert _read(dst).equals(table)
    spare = pm._SPARE.buffers
    assert spare and not any(b"secret-" in buf for buf in spare)


def test_parquet_encryption_reencrypts_modules_through_openbao(make_key_class, vault, tmp_path):
    """Through the real KMS: the file keyrotation wrote, re-encrypted under new data keys wrapped by a new KEK under
    the new master key version; stock pyarrow reads it (through the KMS) equal to the table written; the census,
    the KMS proof and a later rewrap work on it; the old key material does not open it."""
    from helpers import customers, runtime
    from keyrotation.errors import BackendError
    from keyrotation.formats.parquet_pme import ParquetEncryption

    rt = runtime(make_key_class(mode="reencrypt", name="pme_modules"), vault)
    rt.backend.create_key()
    table = customers("2024-03-01", 3000)
    rt.engine("customers").write_partition("2024-03-01", table, 1)
    v2 = rt.backend.rotate()
    pme: ParquetEncryption = rt.pme("customers")
    fs = rt.store("customers").fs
    src = rt.store("customers").path("2024-03-01", "part-00001.parquet")
    dst = str(tmp_path / "part-00002.parquet")

    result = pme.reencrypt_modules(src, dst, fs, v2)
    assert result.encrypted_columns == ["email", "ssn"] and result.bytes == Path(src).stat().st_size

    properties = pme._decryption_properties(dst, fs)
    assert pq.read_table(dst, decryption_properties=properties, page_checksum_verification=True).equals(table)
    assert pme.key_material_facts(dst, fs)[0] == {v2}
    assert pme.inspect(dst, fs).versions == {v2}
    assert pme.inspect(dst, fs).encrypted_columns == {"email", "ssn"}
    old_material = json.loads(Path(key_material_path(src)).read_text())
    new_material = json.loads(Path(key_material_path(dst)).read_text())
    assert new_material.keys() == old_material.keys()
    for ref, entry in new_material.items():
        old_entry, new_entry = json.loads(old_material[ref]), json.loads(entry)
        assert list(new_entry) == list(old_entry)  # pyarrow's fields, in pyarrow's order
        assert {k: v for k, v in new_entry.items() if k not in ("wrappedDEK", "keyEncryptionKeyID", "wrappedKEK")} \
            == {k: v for k, v in old_entry.items() if k not in ("wrappedDEK", "keyEncryptionKeyID", "wrappedKEK")}
        assert new_entry["wrappedDEK"] != old_entry["wrappedDEK"] and new_entry["wrappedKEK"].startswith("vault:v2:")

    v3 = rt.backend.rotate()
    pme.rewrap(dst, fs, v3)
    assert pme.key_material_facts(dst, fs)[0] == {v3}
    assert pme.read(dst, fs).equals(table)

    Path(key_material_path(dst)).write_text(Path(key_material_path(src)).read_text())
    with pytest.raises(BackendError) as refused:
        pme.inspect(dst, fs)
    assert str(refused.value) == f"{dst}: footer does not authenticate under its footer key"


def test_parquet_encryption_refuses_before_writing(make_key_class, vault, tmp_path):
    """A file the module path cannot take (CTR without page CRCs) is refused before the new file or its key
    material is written."""
    from helpers import customers, runtime
    from keyrotation.formats.parquet_pme import _BackendKmsClient

    rt = runtime(make_key_class(mode="reencrypt", name="pme_refused"), vault)
    rt.backend.create_key()
    pme = rt.pme("customers")
    src, dst = str(tmp_path / "src.parquet"), str(tmp_path / "out" / "dst.parquet")
    (tmp_path / "out").mkdir()
    config = pe.EncryptionConfiguration(footer_key=rt.backend.key_ref, column_keys={rt.backend.key_ref: ["ssn"]},
                                        encryption_algorithm="AES_GCM_CTR_V1", internal_key_material=False)
    factory = pe.CryptoFactory(lambda _config: _BackendKmsClient(rt.backend, 1))
    pq.write_table(customers("2024-03-02", 100), src,
                   encryption_properties=factory.file_encryption_properties(KMS, config, src, LOCAL))
    with pytest.raises(ModuleReencryptionUnavailable) as refused:
        pme.reencrypt_modules(src, dst, LOCAL, 1)
    assert refused.value.reason.startswith("AES_GCM_CTR_V1 without page CRCs (column ")
    assert list((tmp_path / "out").iterdir()) == []


def test_engine_takes_the_module_path_and_falls_back_with_its_reason(make_key_class, vault):
    """In reencrypt mode the engine re-encrypts a partition it wrote module by module (the file's encoded bytes
    kept, new data keys, the recorded digest carried over and proven again by validation); a partition it cannot
    take so (a foreign one, no recorded digest) is decoded, the reason recorded."""
    from helpers import customers, runtime
    from keyrotation import ledger as lg
    from keyrotation.formats.digest import table_digest

    rt = runtime(make_key_class(mode="reencrypt", name="pme_engine"), vault)
    rt.backend.create_key()
    ours, foreign = customers("2024-04-01", 2000), customers("2024-04-02", 1500)
    engine = rt.engine("customers")
    engine.write_partition("2024-04-01", ours, 1)
    store = rt.store("customers")
    store.fs.create_dir(store.partition_dir("2024-04-02"), recursive=True)
    rt.pme("customers").write(foreign, store.path("2024-04-02", "data.parquet"), store.fs, 1)
    before = Path(store.path("2024-04-01", "part-00001.parquet")).read_bytes()
    v2 = rt.backend.rotate()

    results = engine.run(["2024-04-01", "2024-04-02"], lambda p: engine.process(p, v2, "reencrypt"))
    assert [(r.action, r.digest) for r in results] == [("reencrypted", table_digest(ours)),
                                                       ("reencrypted", table_digest(foreign))]
    details = [json.loads(r["detail"]) for r in rt.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))]
    assert [(d["path"], d.get("fallback_reason")) for d in details] == [
        ("module", None),
        ("decode", "no recorded digest to carry over (a partition keyrotation did not write or check before)")]
    after = Path(store.path("2024-04-01", "part-00002.parquet")).read_bytes()
    assert len(after) == len(before) and after != before
    assert store.live_files("2024-04-01") == ["part-00002.parquet"]
    assert not Path(store.path("2024-04-01", "part-00001.parquet")).exists()
    for partition, table in (("2024-04-01", ours), ("2024-04-02", foreign)):
        assert engine.validate(partition, min_version=v2).action == "validated"
        assert rt.pme("customers").read(store.path(partition, store.live_files(partition)[0]), store.fs).equals(table)

    v3 = rt.backend.rotate()  # the once foreign partition has a recorded digest now: module by module
    engine = rt.engine("customers")  # an engine knows the KMS's versions as they were when it started
    assert engine.process("2024-04-02", v3, "reencrypt").digest == table_digest(foreign)
    last = json.loads(rt.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))[-1]["detail"])
    assert last["path"] == "module" and "fallback_reason" not in last
    assert engine.validate("2024-04-02", min_version=v3).action == "validated"


def test_a_new_module_that_does_not_decrypt_to_the_old_plaintext_is_refused(tmp_path, monkeypatch):
    """The per-module check has teeth: were a new module's plaintext to differ, nothing would be returned."""
    import keyrotation.formats.pme_modules as pm

    _, src, _, old, new = _written(tmp_path)
    monkeypatch.setattr(pm, "_equal", lambda _a, _b: False)
    with pytest.raises(ModuleReencryptionError) as refused:
        reencrypt_bytes(src.read_bytes(), old, new)
    assert str(refused.value) == "column metadata: the new module does not decrypt to the old one's plaintext"


def test_parquet_encryption_reencrypts_modules_on_s3(make_key_class, vault, moto):
    """File to file through an S3 filesystem (moto server): random-access reads of the source, a streamed
    upload of the new file."""
    import secrets
    from urllib.parse import urlparse

    from helpers import customers, runtime

    rt = runtime(make_key_class(mode="reencrypt", name="pme_s3"), vault)
    rt.backend.create_key()
    bucket = f"pme-{secrets.token_hex(4)}"
    moto.client("s3").create_bucket(Bucket=bucket)
    url = urlparse(moto.url)
    fs = pafs.S3FileSystem(access_key=moto.access_key, secret_key=moto.secret_key, region=moto.region,
                           endpoint_override=url.netloc, scheme=url.scheme)
    pme = rt.pme("customers")
    table = customers("2024-05-01", 5000)
    src, dst = f"{bucket}/p/part-00001.parquet", f"{bucket}/p/part-00002.parquet"
    pme.write(table, src, fs, 1)
    v2 = rt.backend.rotate()
    result = pme.reencrypt_modules(src, dst, fs, v2)
    assert result.bytes == fs.get_file_info(src).size == fs.get_file_info(dst).size
    assert pme.read(dst, fs).equals(table)
    assert pme.inspect(dst, fs).versions == {v2}


def _direct_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A uniformly encrypted file (one explicit key) with an encrypted footer."""
    key, path = os.urandom(16), tmp_path / "direct.parquet"
    pq.write_table(_table(200), path, encryption_properties=pe.create_encryption_properties(key))
    return path, key


def _rewritten_footer(data: bytes, key: bytes, change) -> bytes:  # noqa: ANN001
    """``data`` with its FileCryptoMetaData and decrypted footer given to ``change`` and the footer encrypted
    again under ``key`` (the test's own forgery, to make files pyarrow does not write)."""
    length = struct.unpack("<I", data[-8:-4])[0]
    region = data[-8 - length : -8]
    crypto, end = decode_struct(region)
    params = next(iter(crypto[1].fields.values())).value
    aad = (params.get(1) or b"") + params[2] + b"\0"
    module = region[end:]
    metadata, _ = decode_struct(AESGCM(key).decrypt(module[4:16], module[16:], aad))
    change(crypto, metadata)
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(key).encrypt(nonce, metadata.encode(), aad)
    region = crypto.encode() + struct.pack("<I", len(sealed)) + sealed
    return data[: -8 - length] + region + struct.pack("<I", len(region)) + b"PARE"


def test_bloom_filter_and_unknown_algorithm_refused(tmp_path):
    from keyrotation.formats.thrift_compact import I64, STRUCT

    path, key = _direct_file(tmp_path)
    data = path.read_bytes()
    reencrypt_bytes(data, ModuleKeys(key), ModuleKeys(os.urandom(16)))  # as written, it can

    def bloom(_crypto, metadata):  # noqa: ANN001, ANN202
        metadata[4].items[0][1].items[1][3].set(14, 4, I64)  # column b's bloom_filter_offset

    with pytest.raises(ModuleReencryptionUnavailable) as refused:
        reencrypt_bytes(_rewritten_footer(data, key, bloom), ModuleKeys(key), ModuleKeys(os.urandom(16)))
    assert refused.value.reason == "column b has a bloom filter: encrypted bloom filters are not re-encrypted " \
                                   "module by module"

    def unknown(crypto, _metadata):  # noqa: ANN001, ANN202
        union = crypto[1]
        union.set_raw(3, STRUCT, union.fields[1].raw)
        union.delete(1)

    with pytest.raises(ModuleReencryptionUnavailable) as refused:
        reencrypt_bytes(_rewritten_footer(data, key, unknown), ModuleKeys(key), ModuleKeys(os.urandom(16)))
    assert refused.value.reason == "unknown encryption algorithm (EncryptionAlgorithm member 3)"


def test_file_to_file_memory_is_bounded_by_a_module_not_the_file(tmp_path):
    """Streaming: what a file-to-file re-encryption allocates peaks at a few of its largest modules (pages of
    about 1 MiB here) and a copy buffer, whatever the file's size (24 MB here)."""
    import tracemalloc

    import numpy as np

    rng = np.random.default_rng(7)
    rows = 1_000_000
    table = pa.table({"a": rng.integers(0, 2**62, rows), "b": rng.random(rows), "c": rng.integers(0, 2**62, rows)})
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    _write(src, table, {}, {"use_dictionary": False, "compression": "none"})
    old = _old_keys(src)
    new = _new_keys(src, dst, old)
    tracemalloc.start()
    try:
        reencrypt_file(str(src), str(dst), LOCAL, old, new)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert src.stat().st_size > 20_000_000 and peak < 8_000_000
    assert _read(dst).equals(table)


def test_column_chunk_in_another_file_refused(tmp_path):
    from keyrotation.formats.thrift_compact import BINARY

    path, key = _direct_file(tmp_path)

    def elsewhere(_crypto, metadata):  # noqa: ANN001, ANN202
        metadata[4].items[0][1].items[0].set(1, b"other.parquet", BINARY)

    forged = _rewritten_footer(path.read_bytes(), key, elsewhere)
    with pytest.raises(ModuleReencryptionUnavailable) as refused:
        reencrypt_bytes(forged, ModuleKeys(key), ModuleKeys(os.urandom(16)))
    assert refused.value.reason == "a column chunk lives in another file (ColumnChunk.file_path)"


@pytest.mark.parametrize("walk", WALKS, indirect=True)
@pytest.mark.parametrize("variant", ["gcm plaintext footer page index crc", "ctr page crc"])
def test_flipped_bits_anywhere_are_refused_or_harmless_never_a_crash(variant, walk, tmp_path):
    """Random bit flips (most near the tail, where the lengths and the footer are): each either refused with a
    module re-encryption error, or in bytes that are copied as they are (a plaintext column's)."""
    import random

    config, options, nested = VARIANTS[variant]
    table = _table(500, nested)
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    _write(src, table, config, options)
    old = _old_keys(src)
    new = _new_keys(src, dst, old)
    data = src.read_bytes()
    rng = random.Random(21)
    refused = 0
    for _ in range(150):
        damaged = bytearray(data)
        for _ in range(rng.choice([1, 2, 8])):
            at = rng.randrange(len(data)) if rng.random() < 0.5 else len(data) - rng.randrange(1, 400)
            damaged[at] ^= 1 << rng.randrange(8)
        try:
            reencrypt_bytes(damaged, old, new)
        except (ModuleReencryptionError, ModuleReencryptionUnavailable):
            refused += 1
    assert refused > 100


def test_the_walks_agree(tmp_path, monkeypatch):
    """The C walk and the Python walk re-encrypt the same modules of the same file, the same bytes of them: only
    nonces, so ciphertexts and CRCs (and the extra nonces CRCs take) differ."""
    import keyrotation.formats.pme_modules as pm

    table, src, dst, old, new = _written(tmp_path, options={"write_page_index": True, "write_page_checksum": True},
                                         rows=20_000, nested=True)
    results = {}
    for native in (True, False):
        monkeypatch.setattr(pm, "NATIVE", native)
        data, result = reencrypt_bytes(src.read_bytes(), old, new)
        dst.write_bytes(data)
        assert _read(dst).equals(table)
        results[native] = (result.modules, result.module_bytes, result.crc_pages, result.rows, result.bytes)
    assert results[True] == results[False] and results[True][2] > 0


@pytest.mark.parametrize("walk", WALKS, indirect=True)
def test_pages_larger_than_a_write_stream_through(walk, tmp_path):
    """File to file the C walk reads the source a window at a time (a write's worth, 2 MiB): pages of 3 MiB take
    a window each, as large as they are."""
    import numpy as np

    rng = np.random.default_rng(3)
    blob = rng.bytes(200 * 40_000)
    table = pa.table({"a": pa.array([blob[i * 200 : (i + 1) * 200] for i in range(40_000)], pa.binary()),
                      "b": pa.array(range(40_000), pa.int64())})
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    _write(src, table, {}, {"use_dictionary": False, "compression": "none", "data_page_size": 3 << 20})
    old = _old_keys(src)
    new = _new_keys(src, dst, old)
    result = reencrypt_file(str(src), str(dst), LOCAL, old, new)
    pages = [pq.ParquetFile(src, decryption_properties=pe.CryptoFactory(MemoryKms).file_decryption_properties(
        KMS, pe.DecryptionConfiguration(), str(src), LOCAL)).metadata.row_group(0).column(0)]
    assert result.module_bytes > 8_000_000 and pages[0].total_compressed_size > 8_000_000
    assert result.modules < 20  # pages of about 3 MiB, each with its header: column a's, b's, the footer
    assert _read(dst).equals(table)


@pytest.mark.parametrize("walk", WALKS, indirect=True)
def test_a_new_page_that_does_not_decrypt_to_the_old_plaintext_is_refused(walk, tmp_path, monkeypatch):
    """The per-module check has teeth in both walks: a new key whose decryption of a data page comes back changed
    (told by its AAD, the longest, which only data page headers share, and by a plaintext longer than a header's)
    is refused, file to file with nothing left."""
    import keyrotation.formats.pme_modules as pm

    class Changing:
        def __init__(self, aes: AESGCM) -> None:
            self.aes = aes

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.aes, name)

        def decrypt_into(self, nonce, data, aad, out) -> None:  # noqa: ANN001
            self.aes.decrypt_into(nonce, data, aad, out)
            if len(aad) == page_aad and len(out) > 64:
                out[len(out) // 2] ^= 1

    made = pm._Job._new_cipher

    def changing(self, *args):  # noqa: ANN001, ANN202
        cipher = made(self, *args)
        cipher.new = Changing(cipher.new)
        return cipher

    _, src, dst, old, new = _written(tmp_path)
    page_aad = len(pm._Job(pm._MemorySource(src.read_bytes()), old, None, None, 0).file_aad) + 1 + 2 + 2 + 2
    monkeypatch.setattr(pm._Job, "_new_cipher", changing)
    with pytest.raises(ModuleReencryptionError) as refused:
        reencrypt_file(str(src), str(dst), LOCAL, old, new)
    assert str(refused.value) == "column a: page: the new module does not decrypt to the old one's plaintext"
    assert not dst.exists()


def test_work_buffers_of_different_sizes_are_fitted_both(tmp_path, monkeypatch):
    """A thread's spare buffers differ in size (a stream's copy buffer is one): the plaintext and check buffers
    taken together are both made large enough for a page (they once were not, the check buffer then too short).
    In memory on the Python walk, whose first fit is for a page header: a 4 MiB plaintext buffer and a 1 MiB check
    buffer then, and pages of just over 1 MiB after."""
    import keyrotation.formats.pme_modules as pm

    monkeypatch.setattr(pm, "NATIVE", False)
    blob = os.urandom(100 * 30_000)
    table = pa.table({"a": pa.array([blob[i * 100 : (i + 1) * 100] for i in range(30_000)], pa.binary())})
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    _write(src, table, {"column_keys": {"col_a": ["a"]}}, {"use_dictionary": False, "compression": "none"})
    old = _old_keys(src)
    new = _new_keys(src, dst, old)
    pages = _first_data_page(src, "a")
    assert pages[1] - pages[0] > 1 << 20  # a page longer than the smaller buffer
    monkeypatch.setattr(pm._SPARE, "buffers", [bytearray(4 << 20), bytearray(1 << 20)], raising=False)
    data, _ = reencrypt_bytes(src.read_bytes(), old, new)
    dst.write_bytes(data)
    assert _read(dst).equals(table)


def test_the_native_walk_is_built():
    """``make install`` builds the C walk (scripts/build_native.py): a build that failed would leave every file on
    the Python walk, slower, and this says so."""
    import keyrotation.formats.pme_modules as pm

    assert pm.NATIVE and pm._pme_pages.__file__.endswith(".so")
