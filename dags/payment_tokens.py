"""Airflow DAGs of key class payment_tokens, built from payment_tokens.yaml in the key class folder."""

from keyrotation_airflow.dags import key_class_dags

globals().update(key_class_dags("payment_tokens"))
