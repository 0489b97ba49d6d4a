"""What the ledger proves about each partition, against what the census sees now.

A partition is *proven* under a version when its last validation passed, came after its last
change, found every key under that version or newer, and (Parquet) its versions were confirmed by
the KMS unwrapping its keys, its generation is the one on disk now, and its footers encrypt every
column the config requires. Anything less is a gap: the retirement gate stays shut on a gap and the
planner sends the partition to the next sweep, which validates it (or fails it, with its reason).
"""

from __future__ import annotations

import json

from keyrotation.census import Census, PartitionCensus


def proof_gap(census: Census, partition: PartitionCensus, evidence: dict | None, min_version: int) -> str | None:
    """Why the ledger does not prove ``partition`` under ``min_version`` or newer; None when it does."""
    validation = (evidence or {}).get("validation")
    change = (evidence or {}).get("change")
    if validation is None:
        return "never validated"
    detail = json.loads(validation["detail"] or "{}")
    if validation["status"] != "ok":
        return f"its last validation failed: {detail.get('error') or 'see the ledger row ' + str(validation['id'])}"
    if change is not None and validation["id"] < change["id"]:
        return f"changed ({change['event']}) after its last validation"
    if (validation["from_version"] or 0) < min_version:
        return f"last validated with keys under v{validation['from_version']}, below v{min_version}"
    if census.kind != "parquet_pme":
        return None
    confirmed = frozenset(detail.get("kms_confirmed") or ())
    if not confirmed:
        return "its key versions were never confirmed by the KMS"
    if detail.get("key_material") != partition.material_digest:
        return "its key material changed since it was validated"
    if confirmed != partition.versions:
        return (f"its key material now names {_versions(partition.versions)}, the KMS confirmed "
                f"{_versions(confirmed)} when it was validated")
    if detail.get("generation") != partition.generation:
        return f"generation {partition.generation} is on disk, generation {detail.get('generation')} was validated"
    missing = sorted(census.required_columns - frozenset(detail.get("encrypted_columns") or ()))
    if missing:
        return f"column(s) {', '.join(missing)} not encrypted when it was validated"
    return None


def proof_gaps(census: Census, evidence: dict[str, dict], min_version: int) -> dict[str, str]:
    """Every partition of the census the ledger does not prove under ``min_version`` or newer, with why."""
    gaps = {}
    for name, partition in sorted(census.partitions.items()):
        if (gap := proof_gap(census, partition, evidence.get(name), min_version)) is not None:
            gaps[name] = gap
    return gaps


def _versions(versions: frozenset[int]) -> str:
    return ", ".join(f"v{v}" for v in sorted(versions))
