"""Builds the DAGs of one key class from its config file: wiring only, no logic.

Each key class gets ``rotate__<key_class>``, ``retire__<key_class>`` and one
``reencrypt__<dataset>`` per dataset. A DAG file per key class calls :func:`key_class_dags`, so a
bad config fails that file's import with a message naming the file, the key class and the field,
and every other DAG keeps loading.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import (
    DAG,
    Asset,
    AssetAny,
    AssetOrTimeSchedule,
    AssetWatcher,
    CronDataIntervalTimetable,
    CronTriggerTimetable,
    Param,
)

from keyrotation.backends.registry import backend_class
from keyrotation.config import KeyClass, KeyClassConfig, human_duration, load_key_class
from keyrotation_airflow.notifications import approval_notifiers, failure_callbacks
from keyrotation_airflow.operators.policy import policy_check
from keyrotation_airflow.operators.reencrypt import (
    POLICY_MODE,
    CensusSummaryOperator,
    PlanReencryptionOperator,
    ReencryptPartitionsOperator,
    ValidatePartitionsOperator,
)
from keyrotation_airflow.operators.retire import (
    RetireKeyVersionsOperator,
    RetirementApprovalOperator,
    WaitGracePeriodOperator,
)
from keyrotation_airflow.operators.rotation import RotateKeyOperator, UpdateKeyReferenceOperator
from keyrotation_airflow.sensors.census import CensusGateSensor
from keyrotation_airflow.sensors.key_version import KeyVersionReadySensor

DEFAULT_ARGS = {"owner": "keyrotation", "retries": 2, "retry_delay": timedelta(minutes=1)}


def key_class_asset(name: str) -> Asset:
    return Asset(name=f"keyrotation.key_class.{name}", uri=f"keyrotation://key-class/{name}", group="keyrotation")


# Every change the compliance report must reflect (a retirement, a finished re-encryption) updates this.
AUDIT_ASSET = Asset(name="keyrotation.audit", uri="keyrotation://audit", group="keyrotation")


def dataset_asset(name: str) -> Asset:
    return Asset(name=f"keyrotation.dataset.{name}", uri=f"keyrotation://dataset/{name}", group="keyrotation")


def _start(date: str) -> datetime:
    return datetime.fromisoformat(date).replace(tzinfo=None)


ROTATE_DOC = """
### Rotate key class `{name}`

Checks the master key `{key_ref}` ({backend}, connection `{conn_id}`): when the current version is
older than {due} days (cryptoperiod {period} days), or when triggered with **force**, creates a new
version, waits until it is usable, records it in the ledger as the key class's current version and
emits the asset `keyrotation.key_class.{name}`, which starts a re-encryption sweep of every dataset
under this key class. Not due: the run is skipped and the skip is recorded. A manual run needs a
**reason**. With an event queue configured, each message on it starts a forced rotation.

Config: `{source}`.
"""

REENCRYPT_DOC = """
### Re-encrypt dataset `{dataset}` (key class `{name}`)

Brings partitions of `{location}` under the key class's current master key version, mode
**{mode}** by default (`rewrap`: new key material, data files untouched; `reencrypt`: new data
keys, data rewritten). Each partition is idempotent and crash-safe, then validated by decrypting it
and comparing its digest with the ledger.

- A **scheduled or backfill** run handles its own partition, `dt=<data interval start>`:
  `airflow backfill create --dag-id reencrypt__{dataset} --from-date 2024-01-01 --to-date 2024-01-31`.
- A run started by the key class asset (after a rotation) or **by hand** sweeps every partition
  the census finds under an older version, fanned out in chunks of {chunk}.
"""

RETIRE_DOC = """
### Retire old versions of key class `{name}`

Waits (census gate) until no partition of any dataset of the key class is under a version older
than the newest {kept} and every partition is validated, then waits in the triggerer (deferred, no
worker slot) until the grace period of {grace} since the current version became the reference has
passed{approval}, then retires them through the retirement gate. Otherwise the retire task fails,
with the reasons in its log and in the ledger. Nothing due: the run is skipped. A rejected or
unanswered request is not asked again for the same versions and census (trigger with **Ask again**
to override).
"""

NOT_RETIRABLE_DOC = """
**This key class cannot retire versions.** AWS KMS keeps every key material of `{key_ref}` in
perpetuity (on_demand strategy): the census gate still proves that all data is under the current
material, and the retire task then records that retirement is not possible and is skipped. Use the
alias strategy where old material must be destroyed.
"""


APPROVAL_BODY = """
**Key class** `{name}`, master key `{key_ref}` ({backend}).

**What approving does in the KMS:** it {{{{ ti.xcom_pull(task_ids='wait_grace_period')['effect'] }}}}.

**Grace period:** {grace} since v{{{{ ti.xcom_pull(task_ids='wait_grace_period')['reference_version'] }}}}
became current (by {{{{ ti.xcom_pull(task_ids='wait_grace_period')['rotated_by'] }}}}), ended at
{{{{ ti.xcom_pull(task_ids='wait_grace_period')['grace_end'] }}}}.

**Census the gate passed on** (partitions per oldest wrapping version, read from the key material):

{{% for ds in ti.xcom_pull(task_ids='census_gate')['datasets'] %}}
- `{{{{ ds.dataset }}}}`: {{{{ ds.partitions }}}} partitions
  ({{% for v, n in ds.by_version.items() %}}{{{{ n }}}} under {{{{ v }}}}
  {{%- if not loop.last %}}, {{% endif %}}{{% else %}}none{{% endfor %}});
  under the versions to retire: **{{{{ ds.under_retired_versions }}}}**, unreadable: {{{{ ds.unreadable }}}}
{{% endfor %}}

Reject to keep the versions enabled; the decision, your name and the time go to the ledger.
"""


def kms_events_asset(kc: KeyClass) -> Asset:
    """An asset whose watcher turns each message on the key class's event queue into an asset event."""
    trigger = MessageQueueTrigger(scheme="sqs", sqs_queue=kc.events.sqs_queue, aws_conn_id=kc.events.aws_conn_id,
                                  region_name=kc.events.region_name, waiter_delay=5)
    return Asset(name=f"keyrotation.kms_events.{kc.name}", uri=f"keyrotation://kms-events/{kc.name}",
                 group="keyrotation", watchers=[AssetWatcher(name=f"kms_events_{kc.name}", trigger=trigger)])


def kms_pool(kc: KeyClass) -> dict:
    """``pool=`` for every task that calls the key class's KMS (``kms_pool`` in its config), so that
    more workers never mean more concurrent KMS calls than the pool has slots. The ledger-only task
    (update_reference, but for Cloud KMS where it promotes the version) and the approval (a person)
    stay out of it."""
    return {"pool": kc.kms_pool} if kc.kms_pool else {}


def rotation_schedule(kc: KeyClass) -> object:
    if kc.events is None:
        return kc.rotation.schedule
    if kc.rotation.schedule is None:
        return [kms_events_asset(kc)]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(kc.rotation.schedule, timezone="UTC"),
                               assets=[kms_events_asset(kc)])


def build_rotation_dag(config: KeyClassConfig) -> DAG:
    kc = config.key_class
    with DAG(
        dag_id=f"rotate__{kc.name}",
        description=f"Rotate the master key of key class {kc.name}",
        schedule=rotation_schedule(kc),
        start_date=_start("2024-01-01"),
        catchup=False,
        max_active_runs=1,
        default_args={**DEFAULT_ARGS, **failure_callbacks(kc)},
        tags=["keyrotation", "rotate", kc.name, kc.backend],
        doc_md=ROTATE_DOC.format(name=kc.name, key_ref=kc.key_ref, backend=kc.backend, conn_id=kc.conn_for("rotate"),
                                 due=kc.rotation.due_after.days, period=kc.rotation.cryptoperiod.days,
                                 source=config.source),
        render_template_as_native_obj=True,
        params={
            "force": Param(False, type="boolean", title="Force", section="Rotation",
                           description="Rotate even if the current version is not due yet."),
            # Required in the trigger form (a string, not nullable); "" is the scheduled runs' default, and the
            # rotate task refuses it for a manual run, whatever submitted it.
            "reason": Param("", type="string", maxLength=500, title="Reason", section="Rotation",
                            description="Why this rotation runs (ticket, incident, audit finding): required for a "
                                        "manual run, recorded in the ledger and shown in the report."),
            "dry_run": Param(False, type="boolean", title="Dry run", section="Rotation",
                             description="Say whether a rotation is due and what the sweep after it would "
                                         "touch and cost; change nothing, start nothing."),
        },
    ) as dag:
        pool = kms_pool(kc)
        followers = [f"reencrypt__{ds.name}" for ds in config.datasets] + [f"retire__{kc.name}"]
        rotate = RotateKeyOperator(task_id="rotate_key", key_class=kc.name, force="{{ params.force }}",
                                   reason="{{ params.reason }}", dry_run="{{ params.dry_run }}",
                                   follower_dag_ids=followers, **pool)
        kms = backend_class(kc.backend)
        # Where new versions may be pending a while (Cloud KMS HSM and external keys): wait in the triggerer.
        ready = KeyVersionReadySensor(task_id="wait_version_ready", key_class=kc.name,
                                      version="{{ ti.xcom_pull(task_ids='rotate_key') }}",
                                      poke_interval=10, timeout=3600, mode="reschedule",
                                      deferrable=kms.versions_may_be_pending, **pool)
        # Ledger only, except where promoting the new version to primary is a KMS call of its own (Cloud KMS).
        reference = UpdateKeyReferenceOperator(task_id="update_reference", key_class=kc.name,
                                               version="{{ ti.xcom_pull(task_ids='rotate_key') }}",
                                               outlets=[key_class_asset(kc.name)],
                                               **(pool if kms.promotes_separately else {}))
        rotate >> ready >> reference
        check = policy_check(kc, dry_run="{{ params.dry_run }}", **pool)  # where the key class notifies on overdue
        if check is not None:
            reference >> check
    return dag


def build_reencrypt_dag(config: KeyClassConfig, dataset: str) -> DAG:
    kc, ds = config.key_class, config.dataset(dataset)
    trigger = key_class_asset(kc.name)
    schedule = (AssetOrTimeSchedule(timetable=CronDataIntervalTimetable(ds.schedule, timezone="UTC"),
                                    assets=[trigger]) if ds.schedule else [trigger])
    with DAG(
        dag_id=f"reencrypt__{ds.name}",
        description=f"Re-encrypt dataset {ds.name} under the current version of key class {kc.name}",
        schedule=schedule,
        start_date=_start(ds.start_date),
        catchup=False,
        # Active from the start: Airflow queues no asset event for a paused DAG, so a rotation must never
        # complete into a paused sweep (rotate__* and the report start paused as configured).
        is_paused_upon_creation=False,
        default_args=DEFAULT_ARGS,
        **failure_callbacks(kc),  # the DAG's own: one notice per failed run, not one per failed chunk
        tags=["keyrotation", "reencrypt", kc.name],
        doc_md=REENCRYPT_DOC.format(dataset=ds.name, name=kc.name, location=ds.location,
                                    mode=kc.reencryption.mode, chunk=kc.reencryption.chunking()),
        render_template_as_native_obj=True,
        params={
            "scope": Param("auto", type="string", enum=["auto", "sweep", "range", "interval"], title="Scope",
                           section="Partitions",
                           description="auto: the run's own partition for scheduled/backfill runs, every "
                                       "partition under an old version otherwise; range: the dates below."),
            "partition_from": Param(None, type=["null", "string"], format="date", title="From partition",
                                    section="Partitions",
                                    description="First partition date for scope 'range'."),
            "partition_to": Param(None, type=["null", "string"], format="date", title="To partition",
                                  section="Partitions",
                                  description="Last partition date for scope 'range'."),
            "mode": Param(POLICY_MODE, type="string", enum=[POLICY_MODE, "rewrap", "reencrypt"], title="Mode",
                          section="Mode",
                          values_display={POLICY_MODE: f"The key class's policy ({kc.reencryption.mode})",
                                          "rewrap": "rewrap: new key material, data files untouched",
                                          "reencrypt": "reencrypt: new data keys, data rewritten"},
                          description="Override the key class's mode for this run."),
            "dry_run": Param(False, type="boolean", title="Dry run", section="Mode",
                             description="Log the census and the plan; change nothing."),
        },
    ) as dag:
        pool = kms_pool(kc)
        plan = PlanReencryptionOperator(
            task_id="plan", key_class=kc.name, dataset=ds.name, scope="{{ params.scope }}",
            partition_from="{{ params.partition_from }}", partition_to="{{ params.partition_to }}",
            mode="{{ params.mode }}", dry_run="{{ params.dry_run }}", **pool,
        )
        reencrypt = ReencryptPartitionsOperator.partial(
            task_id="reencrypt", key_class=kc.name, dataset=ds.name, retries=3, **pool,
            map_index_template="{{ task.partitions[0] }}..{{ task.partitions[-1] }}",
        ).expand_kwargs(plan.output)
        validate = ValidatePartitionsOperator.partial(
            task_id="validate", key_class=kc.name, dataset=ds.name, **pool,
        ).expand(results=reencrypt.output)
        summary = CensusSummaryOperator(task_id="census_after", key_class=kc.name, dataset=ds.name,
                                        dry_run="{{ params.dry_run }}", trigger_rule="none_failed",
                                        outlets=[dataset_asset(ds.name), AUDIT_ASSET], **pool)
        plan >> reencrypt >> validate >> summary
    return dag


def build_retire_dag(config: KeyClassConfig) -> DAG:
    kc = config.key_class
    policy = kc.retire
    assets = [dataset_asset(ds.name) for ds in config.datasets]
    with DAG(
        dag_id=f"retire__{kc.name}",
        description=f"Retire old master key versions of key class {kc.name}",
        schedule=AssetAny(*assets) if assets else "@daily",
        start_date=_start("2024-01-01"),
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=False,  # as reencrypt__*: the census gate and the approval hold it, not a pause
        default_args={**DEFAULT_ARGS, "retries": 0, **failure_callbacks(kc)},
        tags=["keyrotation", "retire", kc.name],
        doc_md=RETIRE_DOC.format(name=kc.name, kept=policy.versions_kept, grace=human_duration(policy.grace_period),
                                 approval=", then asks once for a human approval" if policy.approval_required else "")
        + ("" if kc.retires_versions else NOT_RETIRABLE_DOC.format(key_ref=kc.key_ref)),
        params={
            "ask_again": Param(False, type="boolean", title="Ask again", section="Approval",
                               description="Ask for an approval again after the same versions' retirement was "
                                           "rejected or not answered in time (otherwise such a run skips)."),
        },
    ) as dag:
        pool = kms_pool(kc)
        gate = CensusGateSensor(task_id="census_gate", key_class=kc.name, poke_interval=300,
                                timeout=policy.census_timeout.total_seconds(), mode="reschedule", **pool)
        # The grace period is waited for in the triggerer, before anyone is asked.
        wait = WaitGracePeriodOperator(task_id="wait_grace_period", key_class=kc.name,
                                       ask_again="{{ params.ask_again }}", **pool)
        approval = policy.approval_required and kc.retires_versions  # nothing to approve where nothing retires
        retire = RetireKeyVersionsOperator(task_id="retire_versions", key_class=kc.name, outlets=[AUDIT_ASSET],
                                           approval_task_id="approve" if approval else None, **pool)
        if approval:
            approve = RetirementApprovalOperator(
                task_id="approve",
                key_class=kc.name,
                subject=f"Retire versions of key class {kc.name} ({kc.key_ref})?",
                body=APPROVAL_BODY.format(name=kc.name, key_ref=kc.key_ref, backend=kc.backend,
                                          grace=human_duration(policy.grace_period)),
                response_timeout=policy.approval_timeout,
                notifiers=approval_notifiers(kc),
            )
            gate >> wait >> approve >> retire
        else:
            gate >> wait >> retire
    return dag


def key_class_dags(name: str) -> dict[str, DAG]:
    """All DAGs of key class ``name``, by dag_id; raises ConfigError for a bad config file."""
    config = load_key_class(name)
    dags = [build_rotation_dag(config), build_retire_dag(config)]
    dags += [build_reencrypt_dag(config, ds.name) for ds in config.datasets]
    return {dag.dag_id: dag for dag in dags}
