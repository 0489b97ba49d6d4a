"""Registers the keyrotation plugin (the key inventory view) from Airflow's plugins folder, for a checkout; the
installed package registers it through its ``airflow.plugins`` entry point instead."""

from keyrotation_airflow.plugin import KeyRotationPlugin

__all__ = ["KeyRotationPlugin"]
