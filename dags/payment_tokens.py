"""Airflow DAGs of key class payment_tokens, built from include/config/key_classes/payment_tokens.yaml."""

from keyrotation_factory import key_class_dags

globals().update(key_class_dags("payment_tokens"))
