"""keyrotation: the Airflow-free core of the key rotation package.

Layers, bottom up: ``config``, ``ledger`` and ``backends`` (KMS); ``formats`` (Parquet
Modular Encryption); ``stores`` (partitioned datasets); ``census`` and ``engine``
(re-encryption); ``retirement`` (the one gate before old versions are retired) and
``report``. Nothing here imports Airflow.
"""

__version__ = "0.1.0"
