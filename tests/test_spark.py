"""Spark (parquet-java) reads the lake through every rotation: the Transit KmsClient built from the package's
source, one Spark JVM for the module, OpenBao on loopback.

What Spark reads is compared with the rows the test generated (``helpers.customers``), and Hadoop's checksum side
files are checked by this module's own CRC reader, which shares no code with the product.
"""

from __future__ import annotations

import binascii
import json
import logging
import shutil
import socket
import struct
from pathlib import Path

import pyspark
import pytest

from dag_runs import key_class_dags, seed_and_rotate_through_dags, state
from helpers import CANARY, customers, days, runtime, seed

# pyspark 4.3 warns that it does not fully support pandas 3; it only turns the test's generated rows into a frame.
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
if shutil.which("java") is None:
    pytest.fail("Spark needs a JDK: install default-jdk-headless (.ci/run does)")

READER_POLICY = """
path "transit/encrypt/*" { capabilities = ["update"] }
path "transit/decrypt/*" { capabilities = ["update"] }
"""


@pytest.fixture(scope="module")
def client_jar(tmp_path_factory) -> Path:
    from keyrotation.spark.client_jar import build_client_jar

    return build_client_jar(tmp_path_factory.mktemp("spark-client") / "keyrotation-transit-kms-client.jar")


@pytest.fixture(scope="module")
def reader_token(openbao, tmp_path_factory) -> Path:
    """A token file for a reader: Transit encrypt and decrypt, nothing else (no key management)."""
    vault = openbao.client()
    vault.sys.create_or_update_policy("spark-reader", READER_POLICY)
    token = vault.auth.token.create(policies=["spark-reader"], ttl="2h")["auth"]["client_token"]
    path = tmp_path_factory.mktemp("spark-token") / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def spark(openbao, client_jar, reader_token, tmp_path_factory):
    from pyspark.sql import SparkSession

    from keyrotation.spark.client_jar import reader_conf

    builder = (SparkSession.builder.master("local[1]").appName("keyrotation-tests")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "1")
               .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
               .config("spark.driver.memory", "512m")
               .config("spark.local.dir", str(tmp_path_factory.mktemp("spark-local"))))
    for key, value in reader_conf(openbao.url, reader_token, client_jar).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    # py4j logs the closing of each connection when the interpreter exits, after pytest closed its streams.
    logging.getLogger("py4j").setLevel(logging.WARNING)


def forget_keys(spark) -> None:
    """parquet-java keeps unwrapped KEKs for 10 minutes per token; a read after a retirement must ask the KMS."""
    spark._jvm.org.apache.parquet.crypto.keytools.KeyToolkit.removeCacheEntriesForAllTokens()


def expected_rows(partitions: list[str], rows: int) -> list[tuple]:
    return sorted((r["id"], r["day"], r["email"], r["ssn"], day) for day in partitions
                  for r in customers(day, rows).to_pylist())


def spark_rows(spark, location) -> list[tuple]:
    frame = spark.read.parquet(str(location))
    return sorted((r["id"], r["day"], r["email"], r["ssn"], r["dt"])
                  for r in frame.select("id", "day", "email", "ssn", "dt").collect())


def side_files(location: Path) -> dict[Path, Path]:
    """Every Hadoop checksum side file under ``location``, with the file it is for."""
    return {crc: crc.with_name(crc.name[1:-len(".crc")]) for crc in location.rglob(".*.crc")}


def side_file_matches(crc: Path, data: Path) -> bool:
    """Hadoop's format, read here: b"crc\\0", the chunk size (big-endian int), a CRC-32 per chunk."""
    raw = crc.read_bytes()
    if raw[:4] != b"crc\0":
        return False
    chunk = struct.unpack(">i", raw[4:8])[0]
    content = data.read_bytes()
    sums = [binascii.crc32(content[i:i + chunk]) for i in range(0, len(content), chunk)]
    return raw[8:] == b"".join(struct.pack(">I", s) for s in sums)


def java_error(exc: BaseException) -> tuple[str, str]:
    """The class and message of the Java exception py4j raised."""
    java = exc.java_exception
    return java.getClass().getName(), java.getMessage()


def spark_write(spark, location: Path, key_ref: str, partitions: list[str], rows: int) -> None:
    """Partitions written by Spark itself: its file names, its key material, its checksum side files."""
    import pyarrow as pa

    table = pa.concat_tables([customers(day, rows) for day in partitions])
    frame = spark.createDataFrame(table.to_pandas()).withColumn("dt", pyspark.sql.functions.col("day"))
    (frame.repartition("dt").write.partitionBy("dt")
     .option("parquet.encryption.footer.key", key_ref)
     .option("parquet.encryption.column.keys", f"{key_ref}:email,ssn")
     .option("parquet.encryption.key.material.store.internally", "false")
     .mode("append").parquet(str(location)))


# -- the client on its own ------------------------------------------------------------------------------------------

def _client(spark, url, token=None, token_file=None):
    jvm = spark._jvm
    conf = jvm.org.apache.hadoop.conf.Configuration(False)
    if url is not None:
        conf.set("parquet.encryption.kms.instance.url", url)
    if token_file is not None:
        conf.set("keyrotation.transit.token.file", str(token_file))
    client = jvm.io.keyrotation.parquet.TransitKmsClient()
    client.initialize(conf, "DEFAULT", "DEFAULT", token or "DEFAULT")
    return client


def test_the_client_speaks_the_python_backends_wire_contract(spark, reader_token, make_key_class, vault, openbao):
    config = make_key_class(name="spk_wire", dataset="spk_wire")
    rt = runtime(config, vault)
    rt.backend.create_key()
    client = _client(spark, openbao.url, token_file=reader_token)
    key = bytes(range(16))
    wrapped = client.wrapKey(key, rt.backend.key_ref)
    assert wrapped.startswith("vault:v1:")
    assert rt.backend.unwrap(wrapped) == key  # what Spark wraps, the Python backend unwraps ...
    assert bytes(client.unwrapKey(rt.backend.wrap(key), rt.backend.key_ref)) == key  # ... and the reverse


def test_the_client_refuses_clearly(spark, reader_token, make_key_class, vault, openbao):
    from py4j.protocol import Py4JJavaError

    config = make_key_class(name="spk_err", dataset="spk_err")
    rt = runtime(config, vault)
    rt.backend.create_key()
    ref = rt.backend.key_ref
    wrapped_v1 = rt.backend.wrap(b"k" * 16)
    where = f"at {openbao.url}/v1/transit"

    with pytest.raises(Py4JJavaError) as unset:
        _client(spark, None, token_file=reader_token)
    assert java_error(unset.value) == (
        "org.apache.parquet.crypto.ParquetCryptoRuntimeException",
        "TransitKmsClient: set parquet.encryption.kms.instance.url to the Transit server's URL; without it "
        "parquet-java takes the URL written in each file's key material and would send the token there")

    with pytest.raises(Py4JJavaError) as no_token:
        _client(spark, openbao.url)
    assert java_error(no_token.value) == (
        "org.apache.parquet.crypto.KeyAccessDeniedException",
        "TransitKmsClient: no token: set parquet.encryption.key.access.token or keyrotation.transit.token.file")

    # A valid token without the reader's policy: denied, and the token is in no message.
    other = vault.auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    with pytest.raises(Py4JJavaError) as denied:
        _client(spark, openbao.url, token=other).unwrapKey(wrapped_v1, ref)
    name, message = java_error(denied.value)
    assert name == "org.apache.parquet.crypto.KeyAccessDeniedException"
    assert message == (f"Transit decrypt with key '{ref}' (ciphertext version v1) {where}: denied (HTTP 403): the "
                       f"token is not valid or lacks the policy for transit/decrypt/{ref}: 1 error occurred: * "
                       "permission denied")
    assert other not in str(denied.value) and reader_token.read_text().strip() not in str(denied.value)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(Py4JJavaError) as unreachable:
        _client(spark, f"http://127.0.0.1:{closed}", token_file=reader_token).unwrapKey(wrapped_v1, ref)
    assert java_error(unreachable.value) == (
        "org.apache.parquet.crypto.ParquetCryptoRuntimeException",
        f"Transit decrypt with key '{ref}' (ciphertext version v1) at http://127.0.0.1:{closed}/v1/transit: the "
        "server is unreachable (connection refused)")

    with pytest.raises(Py4JJavaError) as foreign:
        _client(spark, openbao.url, token_file=reader_token).unwrapKey("aws:v1:AAAA", ref)
    assert java_error(foreign.value)[1] == (
        f"TransitKmsClient: a wrapped key of master key '{ref}' is not a Transit ciphertext (no vault:vN: prefix); "
        "a key wrapped by another KMS needs that KMS's client")

    rt.backend.rotate()
    rt.backend.retire_below(2)
    with pytest.raises(Py4JJavaError) as too_old:
        _client(spark, openbao.url, token_file=reader_token).unwrapKey(wrapped_v1, ref)
    assert java_error(too_old.value) == (
        "org.apache.parquet.crypto.ParquetCryptoRuntimeException",
        f"Transit decrypt with key '{ref}' (ciphertext version v1) {where}: refused, version v1 is below the key's "
        "min_decryption_version (retired); the file's key material must be re-wrapped under a current version: "
        "ciphertext or signature version is disallowed by policy (too old)")


# -- the lake through the DAGs ----------------------------------------------------------------------------------------

def test_spark_reads_what_the_dags_rewrap_reencrypt_and_retire(spark, make_key_class, vault, airflow_db, tmp_path):
    from keyrotation import ledger as lg

    config = make_key_class(name="spk_dags", mode="rewrap", dataset="spk_dags_customers")
    rt = runtime(config, vault)
    dags = key_class_dags("spk_dags")
    location = Path(config.dataset("spk_dags_customers").location)
    parts = days("2024-03-01", 3)
    expected = expected_rows(parts, 50)
    seed_and_rotate_through_dags(rt, dags, "spk_dags_customers", parts)
    assert spark_rows(spark, location) == expected  # written by pyarrow under v1, before any re-wrap

    # A copy of one partition as v1 left it, read again once v1 is retired.
    old = tmp_path / "old" / f"dt={parts[0]}"
    shutil.copytree(location / f"dt={parts[0]}", old)

    sweep = dags["reencrypt__spk_dags_customers"]
    assert state(sweep.test(run_conf={"scope": "sweep", "mode": "rewrap"})) == "success"
    assert rt.census("spk_dags_customers").by_version() == {2: 3}
    assert spark_rows(spark, location) == expected

    assert state(dags["rotate__spk_dags"].test(run_conf={"force": True, "reason": "test: spark"})) == "success"
    assert state(sweep.test(run_conf={"scope": "sweep", "mode": "reencrypt"})) == "success"
    assert rt.census("spk_dags_customers").by_version() == {3: 3}
    paths = {json.loads(r["detail"])["path"] for r in rt.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))}
    assert paths == {"module"}
    assert spark_rows(spark, location) == expected

    assert state(dags["retire__spk_dags"].test()) == "success"
    assert rt.backend.key_state().min_decryption_version == 3
    forget_keys(spark)
    assert spark_rows(spark, location) == expected
    with pytest.raises(Exception) as refused:
        spark.read.parquet(str(old.parent)).collect()
    assert (f"Transit decrypt with key '{rt.backend.key_ref}' (ciphertext version v1) at "
            f"{rt.backend.client.url}/v1/transit: refused, version v1 is below the key's min_decryption_version "
            "(retired)") in str(refused.value)
    assert CANARY not in str(refused.value)
    assert side_files(location) == {}  # pyarrow wrote every file: Hadoop's side files are Spark's own


def test_a_partition_spark_wrote_is_counted_rotated_and_read_by_both(spark, make_key_class, vault, airflow_db):
    from keyrotation import ledger as lg

    config = make_key_class(name="spk_own", mode="rewrap", dataset="spk_own_customers")
    rt = runtime(config, vault)
    dags = key_class_dags("spk_own")
    location = Path(config.dataset("spk_own_customers").location)
    location.mkdir(parents=True)
    parts = days("2024-04-01", 2)
    expected = expected_rows(parts, 30)
    seed(rt, "spk_own_customers", [])
    spark_write(spark, location, rt.backend.key_ref, parts, 30)

    folder = location / f"dt={parts[0]}"
    data = sorted(p.name for p in folder.glob("part-*.parquet"))
    assert len(data) == 1 and data[0].endswith(".c000.snappy.parquet")  # Spark's names, not the engine's
    crcs = side_files(location)
    material = folder / f"_KEY_MATERIAL_FOR_{data[0]}.json"
    assert folder / f".{material.name}.crc" in crcs and all(side_file_matches(c, f) for c, f in crcs.items())
    census = rt.census("spk_own_customers")
    assert census.by_version() == {1: 2} and not census.errors

    assert state(dags["rotate__spk_own"].test(run_conf={"force": True, "reason": "test: spark"})) == "success"
    sweep = dags["reencrypt__spk_own_customers"]
    assert state(sweep.test(run_conf={"scope": "sweep", "mode": "rewrap"})) == "success"
    census = rt.census("spk_own_customers")
    # adopted: Spark's files, their key material and side files are the partition's own, none unmanaged
    assert census.by_version() == {2: 2} and census.summary()["unmanaged_files"] == 0
    forget_keys(spark)
    assert spark_rows(spark, location) == expected  # a stale side file fails this read (ChecksumException)
    # The key material was rewritten in place, and its side file with it: present and right, not stale.
    after = side_files(location)
    assert set(after) == set(crcs) and all(side_file_matches(c, f) for c, f in after.items())
    engine = rt.engine("spk_own_customers")
    assert {engine.validate(p).action for p in parts} == {"validated"}

    assert state(dags["rotate__spk_own"].test(run_conf={"force": True, "reason": "test: spark"})) == "success"
    assert state(sweep.test(run_conf={"scope": "sweep", "mode": "reencrypt"})) == "success"
    assert rt.census("spk_own_customers").by_version() == {3: 2}
    # Module by module (the digest the validation recorded carries over), parquet-java's page headers included.
    reencrypted = rt.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))
    assert [json.loads(r["detail"]).get("fallback_reason") for r in reencrypted] == [None, None]
    assert {json.loads(r["detail"])["path"] for r in reencrypted} == {"module"}
    # Spark's files went with their generation, and their side files with them: none left without its file.
    assert not list(folder.glob("part-*.c000.snappy.parquet"))
    assert all(f.exists() for f in side_files(location).values())
    assert state(dags["retire__spk_own"].test()) == "success"
    forget_keys(spark)
    assert spark_rows(spark, location) == expected
    engine = rt.engine("spk_own_customers")  # an engine knows the versions the KMS had when it was made
    assert {engine.validate(p).action for p in parts} == {"validated"}


def test_a_crash_while_the_side_file_is_rewritten_leaves_none_stale(spark, make_key_class, vault):
    config = make_key_class(name="spk_crash", mode="rewrap", dataset="spk_crash_customers")
    rt = runtime(config, vault)
    location = Path(config.dataset("spk_crash_customers").location)
    location.mkdir(parents=True)
    parts = days("2024-05-01", 1)
    seed(rt, "spk_crash_customers", [])
    spark_write(spark, location, rt.backend.key_ref, parts, 20)
    target = rt.backend.rotate()

    def crash(name: str) -> None:
        if name == "checksum_removed":
            raise RuntimeError("killed at checksum_removed")

    engine = rt.engine("spk_crash_customers", checkpoint=crash)
    before = side_files(location)
    with pytest.raises(RuntimeError, match="killed at checksum_removed"):
        engine.run(parts, lambda p: engine.process(p, target, "rewrap"))
    # The old key material is in place and its side file gone: Hadoop reads it unchecked, never against a stale one.
    after = side_files(location)
    assert len(after) == len(before) - 1 and all(side_file_matches(c, f) for c, f in after.items())
    assert not any(f.name.startswith("_KEY_MATERIAL_FOR_") for f in after.values())
    forget_keys(spark)
    assert spark_rows(spark, location) == expected_rows(parts, 20)  # the old key material, still readable
    engine = rt.engine("spk_crash_customers")
    assert [r.action for r in engine.run(parts, lambda p: engine.process(p, target, "rewrap"))] == ["rewrapped"]
    assert all(side_file_matches(c, f) for c, f in side_files(location).items())
    forget_keys(spark)
    assert spark_rows(spark, location) == expected_rows(parts, 20)
