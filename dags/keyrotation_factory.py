"""The DAG factory, kept importable from the DAG folder (tests' DAG files use it): it lives in the package,
:mod:`keyrotation_airflow.dags`."""

from keyrotation_airflow.dags import AUDIT_ASSET, DEFAULT_ARGS, key_class_asset, key_class_dags

__all__ = ["AUDIT_ASSET", "DEFAULT_ARGS", "key_class_asset", "key_class_dags"]
