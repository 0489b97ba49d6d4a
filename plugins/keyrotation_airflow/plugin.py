"""The keyrotation Airflow plugin: the key inventory view in the UI's Browse menu. Registered through the
``airflow.plugins`` entry point of the installed package, or by ``plugins/keyrotation_plugin.py`` in a checkout."""

from airflow.plugins_manager import AirflowPlugin

from keyrotation_airflow.inventory import create_app


class KeyRotationPlugin(AirflowPlugin):
    name = "keyrotation"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/keyrotation", "name": "Key inventory"}]
    external_views = [
        {
            "name": "Key inventory",
            "href": "/keyrotation/inventory",
            "destination": "nav",
            "category": "browse",
            "url_route": "key-inventory",
        }
    ]
