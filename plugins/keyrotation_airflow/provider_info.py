"""What ``airflow providers list`` and the UI's Providers page show of the installed package (the
``apache_airflow_provider`` entry point)."""

from __future__ import annotations

from typing import Any

from keyrotation import __version__


def get_provider_info() -> dict[str, Any]:
    # No "connection-types": the hooks use the hashicorp, amazon, google and http providers' connection types
    # (vault, aws, google_cloud_platform, http); registering those again would only make Airflow warn.
    return {
        "package-name": "keyrotation",
        "name": "Key rotation",
        "description": "Rotates KMS master keys (Vault/OpenBao Transit, AWS KMS, Google Cloud KMS), re-encrypts "
                       "the data under them and retires old versions, with a ledger and compliance reports.",
        "versions": [__version__],
        "integrations": [{"integration-name": "Key rotation", "tags": ["security"]}],
        "hooks": [{
            "integration-name": "Key rotation",
            "python-modules": [
                "keyrotation_airflow.hooks.vault_transit",
                "keyrotation_airflow.hooks.aws_kms",
                "keyrotation_airflow.hooks.gcp_kms",
                "keyrotation_airflow.hooks.storage",
                "keyrotation_airflow.hooks.airflow_api",
            ],
        }],
        "operators": [{
            "integration-name": "Key rotation",
            "python-modules": [
                "keyrotation_airflow.operators.rotation",
                "keyrotation_airflow.operators.reencrypt",
                "keyrotation_airflow.operators.retire",
                "keyrotation_airflow.operators.policy",
                "keyrotation_airflow.operators.ledger",
                "keyrotation_airflow.operators.report",
            ],
        }],
        "sensors": [{
            "integration-name": "Key rotation",
            "python-modules": ["keyrotation_airflow.sensors.census", "keyrotation_airflow.sensors.key_version"],
        }],
        "triggers": [{
            "integration-name": "Key rotation",
            "python-modules": ["keyrotation_airflow.triggers.key_version"],
        }],
        "notifications": ["keyrotation_airflow.notifications.KeyClassNotifier"],
        "plugins": [{"name": "keyrotation", "plugin-class": "keyrotation_airflow.plugin.KeyRotationPlugin"}],
    }
