"""Airflow DAGs of key class customer_pii, built from include/config/key_classes/customer_pii.yaml."""

from keyrotation_factory import key_class_dags

globals().update(key_class_dags("customer_pii"))
