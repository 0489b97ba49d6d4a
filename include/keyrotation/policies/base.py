"""What every backend's policy module checks of its input."""

from __future__ import annotations

from keyrotation.config import KeyClassConfig


def check_target(config: KeyClassConfig, backend: str, target: dict[str, str], accepted: tuple[str, ...] = ()) -> None:
    """A backend module's own check: the key class is on ``backend`` and ``target`` names only ``accepted``."""
    kc = config.key_class
    if kc.backend != backend:
        raise ValueError(f"key class {kc.name!r}: backend {kc.backend!r}, not {backend}")
    if unknown := sorted(set(target) - set(accepted)):
        raise ValueError(f"key class {kc.name!r} ({backend}) takes no {', '.join(unknown)}")
