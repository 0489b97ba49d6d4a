"""Build the Transit ``KmsClient`` jar for Spark / parquet-java, and the settings that read a lake with it.

The client is one Java source shipped with the package (``TransitKmsClient.java``), compiled with the JDK's
``javac`` against the Spark installation it will run in (its ``jars/`` folder holds parquet-java, Hadoop and
Jackson), so it never disagrees with the parquet-java it is loaded into. No Maven, nothing downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from keyrotation import __version__

CLIENT_CLASS = "io.keyrotation.parquet.TransitKmsClient"
SOURCE = Path(__file__).with_name("TransitKmsClient.java")
CRYPTO_FACTORY = "org.apache.parquet.crypto.keytools.PropertiesDrivenCryptoFactory"


class ClientBuildError(RuntimeError):
    """The client jar could not be built (no JDK, no Spark jars, a compile error)."""


def spark_jars(spark_home: str | os.PathLike | None = None) -> Path:
    """The ``jars/`` folder of a Spark installation: ``spark_home``, else ``$SPARK_HOME``, else the pyspark package
    importable here."""
    home = spark_home or os.environ.get("SPARK_HOME")
    if home:
        jars = Path(home) / "jars"
    else:
        try:
            import pyspark
        except ImportError:
            raise ClientBuildError("no Spark found: give its folder (--spark-home) or set SPARK_HOME") from None
        jars = Path(pyspark.__file__).parent / "jars"
    if not any(jars.glob("parquet-hadoop-*.jar")):
        raise ClientBuildError(f"{jars} holds no parquet-hadoop jar: not a Spark installation's jars/ folder")
    return jars


def build_client_jar(out: str | os.PathLike, jars: str | os.PathLike | None = None) -> Path:
    """Compile the client against ``jars`` (default: :func:`spark_jars`) into the jar ``out``; return its path."""
    javac = shutil.which("javac")
    if javac is None:
        raise ClientBuildError("javac not found: install a JDK 11 or newer (Debian: default-jdk-headless)")
    classpath = str(Path(jars) if jars is not None else spark_jars()) + os.sep + "*"
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="keyrotation-kms-client-") as classes:
        done = subprocess.run([javac, "--release", "11", "-Xlint:all,-path", "-Werror", "-cp", classpath,
                               "-d", classes, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise ClientBuildError(f"javac failed:\n{done.stderr.strip()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_name(f".{out.name}.tmp")
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as jar:
            jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nCreated-By: keyrotation "
                                                 f"{__version__}\r\nImplementation-Version: {__version__}\r\n\r\n")
            for path in sorted(Path(classes).rglob("*.class")):
                jar.write(path, path.relative_to(classes).as_posix())
        staged.replace(out)
    return out


def reader_conf(url: str, token_file: str | os.PathLike, jar: str | os.PathLike | None = None,
                mount: str = "transit") -> dict[str, str]:
    """The Spark settings that read (and write) PME Parquet through Transit at ``url``: the token is read from
    ``token_file`` by the client, so it is in no Spark setting; ``jar`` on the driver's and executors' class
    path (on a cluster, ship it with ``--jars`` instead)."""
    conf = {
        "spark.hadoop.parquet.crypto.factory.class": CRYPTO_FACTORY,
        "spark.hadoop.parquet.encryption.kms.client.class": CLIENT_CLASS,
        "spark.hadoop.parquet.encryption.kms.instance.url": url,
        "spark.hadoop.keyrotation.transit.token.file": str(token_file),
        "spark.hadoop.keyrotation.transit.mount": mount,
    }
    if jar is not None:
        conf["spark.jars"] = str(jar)
    return conf
