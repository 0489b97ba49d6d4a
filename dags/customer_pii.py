"""Airflow DAGs of key class customer_pii, built from customer_pii.yaml in the key class folder."""

from keyrotation_airflow.dags import key_class_dags

globals().update(key_class_dags("customer_pii"))
