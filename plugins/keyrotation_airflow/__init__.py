"""Airflow adapters for keyrotation: hooks own connections and clients; operators, sensors and
triggers are thin wrappers over the Airflow-free core in ``keyrotation``."""
