"""Operators of the re-encryption DAG: plan (census), re-encrypt chunks, validate, summarise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

from keyrotation import ledger as lg
from keyrotation.errors import PartitionError
from keyrotation.planning import chunk, chunk_by_work, estimate, partition_work, select_partitions
from keyrotation_airflow.operators.base import KeyClassOperator
from keyrotation_airflow.operators.rotation import as_bool
from keyrotation_airflow.task_runtime import partitions_failed, run_context, run_type

INTERVAL_RUN_TYPES = ("scheduled", "backfill")


#: The ``mode`` that means "as the key class's policy says" (the trigger form's default choice).
POLICY_MODE = "policy"


class PlanReencryptionOperator(KeyClassOperator):
    """
    Take the census of a dataset and plan the partitions to bring under the key class's current version.

    Returns a list of ``{"partitions": [...], "target_version": N, "mode": ...}``, one per mapped
    re-encryption task: chunks of about ``reencryption.chunk_target`` of estimated work each (from the census
    and the mode), or of ``reencryption.chunk_size`` partitions where the key class sets it; never more
    than Airflow's ``max_map_length``.

    :param key_class: Key class name. (templated)
    :param dataset: Dataset name within the key class. (templated)
    :param scope: ``auto`` (the run's own partition for scheduled and backfill runs, every partition
        otherwise), ``interval``, ``range`` or ``sweep``. (templated)
    :param partition_from: First partition (YYYY-MM-DD) for scope ``range``. (templated)
    :param partition_to: Last partition (YYYY-MM-DD) for scope ``range``. (templated)
    :param mode: ``rewrap`` or ``reencrypt``; ``policy`` (or empty): the key class's policy. (templated)
    :param dry_run: Log the plan and change nothing. (templated)
    """

    role = "reencrypt"
    template_fields: Sequence[str] = ("key_class", "dataset", "scope", "partition_from", "partition_to", "mode",
                                      "dry_run")
    ui_color = "#e3f4d7"

    def __init__(self, *, key_class: str, dataset: str, scope: str = "auto", partition_from: str | None = None,
                 partition_to: str | None = None, mode: str | None = None, dry_run: bool | str = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.dataset = dataset
        self.scope = scope
        self.partition_from = partition_from
        self.partition_to = partition_to
        self.mode = mode
        self.dry_run = dry_run

    def execute(self, context: Any) -> list[dict]:
        rt = self.runtime
        policy = rt.config.key_class.reencryption
        mode = policy.mode if self.mode in (None, "", POLICY_MODE) else self.mode
        target = rt.target_version()
        try:
            # Censuses of partitions unchanged since the last census are reused: the plan only says where to look;
            # every partition is read again by the engine before it is changed, and census_after reads them all.
            census = rt.census(self.dataset, reuse=True)
        except PartitionError as exc:  # the dataset as a whole is unreadable (e.g. its location is gone)
            rt.ledger.record(lg.PARTITION_FAILED, rt.name, run_context(context), status="failed",
                             dataset=self.dataset, partition=exc.partition, detail={"error": str(exc)})
            raise
        self.log.info("before: %s; target v%s, mode %s", census.format(), target, mode)
        scope = self.scope
        if scope == "auto":
            scope = "interval" if run_type(context) in INTERVAL_RUN_TYPES else "sweep"
        # A scheduled run also catches up what the rotation's own sweep left (e.g. its asset event was lost),
        # once that sweep has had its time; a backfill touches its own partition only.
        catch_up = self.scope == "auto" and run_type(context) == "scheduled" and rt.current_for() > \
            rt.config.key_class.reencryption.catch_up_after
        start = context.get("data_interval_start")
        unfinished = rt.unfinished(census, target)
        if unfinished:
            self.log.info("%d partitions to finish or validate again: %s", len(unfinished), "; ".join(
                f"{p}: {why}" for p, why in list(unfinished.items())[:10]) + (" ..." if len(unfinished) > 10 else ""))
        partitions = select_partitions(
            census, target, mode, scope, interval_partition=start.date().isoformat() if start else None,
            partition_from=self.partition_from, partition_to=self.partition_to, unfinished=unfinished,
            catch_up=catch_up,
        )
        data_format = rt.config.dataset(self.dataset).format
        if policy.chunk_size is not None:
            chunks = chunk(partitions, policy.chunk_size)
            sizing = f"chunks of {policy.chunk_size} (reencryption.chunk_size)"
        else:
            goal = policy.chunk_target.total_seconds()
            chunks = chunk_by_work(partitions, census, mode, goal, data_format=data_format)
            work = sum(partition_work(census, partitions, mode, data_format))
            sizing = (f"chunks of about {work / max(len(chunks), 1):.1f} s of estimated work each "
                      f"(target {goal:.0f} s)")
        self.log.info("plan (%s): %d partitions to bring under v%s in %d %s: %s", scope, len(partitions),
                      target, len(chunks), sizing,
                      ", ".join(partitions[:10]) + (" ..." if len(partitions) > 10 else ""))
        cost = estimate(census, partitions, mode, data_format, rt.backend.server_side_rewrap)
        self.log.info("plan totals: %d rows, %d bytes, %d files; about %d KMS requests (%s), at list prices "
                      "about $%.4f on AWS KMS or Cloud KMS (software keys), $0 on Vault/OpenBao", cost.rows,
                      cost.bytes, cost.files, cost.kms_requests, cost.basis, cost.cloud_cost_usd)
        if as_bool(self.dry_run):
            summary = {"dry_run": True, "dataset": self.dataset, "scope": scope, "mode": mode, "target_version": target,
                       "partitions": len(partitions), "chunks": len(chunks), "files": cost.files, "rows": cost.rows,
                       "bytes": cost.bytes, "kms_requests": cost.kms_requests,
                       "cloud_cost_usd": round(cost.cloud_cost_usd, 4), "census": census.summary()}
            rt.ledger.record(lg.DRY_RUN, rt.name, run_context(context), status="dry_run", dataset=self.dataset,
                             to_version=target, rows=cost.rows, bytes=cost.bytes, detail=summary)
            context["ti"].xcom_push(key="dry_run_summary", value=summary)
            self.log.info("dry run: nothing changed; summary (XCom dry_run_summary): %s", summary)
            return []
        return [{"partitions": c, "target_version": target, "mode": mode} for c in chunks]


class ReencryptPartitionsOperator(KeyClassOperator):
    """
    Bring a chunk of partitions under ``target_version`` (idempotent, crash-safe per partition).

    A failing partition is recorded in the ledger and does not stop the others; the task fails at
    the end, naming every failed partition. Returns one result per partition (no key material).

    :param key_class: Key class name. (templated)
    :param dataset: Dataset name. (templated)
    :param partitions: Partition values (``YYYY-MM-DD``).
    :param target_version: Master key version to bring them under.
    :param mode: ``rewrap`` or ``reencrypt``.
    """

    role = "reencrypt"
    template_fields: Sequence[str] = ("key_class", "dataset")
    ui_color = "#e3f4d7"

    def __init__(self, *, key_class: str, dataset: str, partitions: list[str], target_version: int, mode: str,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.dataset = dataset
        self.partitions = partitions
        self.target_version = target_version
        self.mode = mode

    def execute(self, context: Any) -> list[dict]:
        rt = self.runtime
        engine = rt.engine(self.dataset, run_context(context))
        target = int(self.target_version)
        results = engine.process_many(list(self.partitions), target, self.mode)
        failed = [r for r in results if r.action == "failed"]
        if failed:
            raise partitions_failed(failed, f"{self.dataset}: {len(failed)} of {len(results)} partitions failed: "
                                    + "; ".join(f"{r.partition}: {r.error}" for r in failed))
        return [r.to_dict() for r in results]


class ValidatePartitionsOperator(KeyClassOperator):
    """
    Decrypt each re-encrypted partition and check its digest against the ledger, and that its keys
    are all under the target version.

    :param key_class: Key class name. (templated)
    :param dataset: Dataset name. (templated)
    :param results: The re-encryption task's results for one chunk.
    """

    role = "reencrypt"
    template_fields: Sequence[str] = ("key_class", "dataset")
    ui_color = "#d7e8f4"

    def __init__(self, *, key_class: str, dataset: str, results: list[dict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.dataset = dataset
        self.results = results

    def execute(self, context: Any) -> list[dict]:
        rt = self.runtime
        engine = rt.engine(self.dataset, run_context(context))
        targets = {r["partition"]: r["to_version"] for r in self.results}
        validated = engine.run(list(targets), lambda p: engine.validate(p, min_version=targets[p]))
        failed = [r for r in validated if r.action == "failed"]
        if failed:
            raise partitions_failed(failed, f"{self.dataset}: validation failed for {len(failed)} partitions: "
                                    + "; ".join(f"{r.partition}: {r.error}" for r in failed))
        self.log.info("%s: %d partitions decrypt to their recorded digests", self.dataset, len(validated))
        return [r.to_dict() for r in validated]


class CensusSummaryOperator(KeyClassOperator):
    """
    Log the dataset's census after the run and emit the dataset's Asset event with it. Skipped in a dry
    run: a skipped task emits no asset event, so a dry run starts no retirement and no report.

    :param key_class: Key class name. (templated)
    :param dataset: Dataset name. (templated)
    :param dry_run: The run is a dry run. (templated)
    """

    role = "reencrypt"
    template_fields: Sequence[str] = ("key_class", "dataset", "dry_run")

    def __init__(self, *, key_class: str, dataset: str, dry_run: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.dataset = dataset
        self.dry_run = dry_run

    def execute(self, context: Any) -> dict:
        if as_bool(self.dry_run):
            raise AirflowSkipException(f"{self.dataset}: dry run: no census asset event, nothing started downstream")
        rt = self.runtime
        census = rt.census(self.dataset)
        target = rt.target_version()
        self.log.info("after: %s; %d partitions under versions older than v%s", census.format(),
                      len(census.under(target)), target)
        summary = {**census.summary(), "key_class": rt.name, "current_version": target,
                   "under_old_versions": len(census.under(target))}
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = summary
        return summary
