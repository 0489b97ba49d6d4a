"""Key class and dataset configuration, one YAML file per key class, validated with pydantic.

A key class file looks like::

    key_class:
      name: customer_pii
      backend: vault_transit
      key_ref: customer-pii
      conn_id: vault_keyrotation
      rotation: {schedule: "0 3 * * 1", cryptoperiod: 90d}
      reencryption: {mode: rewrap}
      retire: {grace_period: 7d, versions_kept: 1, approval_required: true}
    datasets:
      - name: customers
        location: ${KEYROTATION_DATA_DIR}/customers
        encrypted_columns: [email, ssn]

``${VAR}`` and ``${VAR:-default}`` are expanded from the environment. Any error names the
file, the key class and the field at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from keyrotation.errors import ConfigError

if TYPE_CHECKING:
    from keyrotation.backends.base import KmsBackend

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = r"^[a-z][a-z0-9_]*$"
#: Environment variable: the connection id of every role a key class's ``connections:`` does not list, as a
#: template over ``{conn_id}``, ``{key_class}`` and ``{role}`` (``make up``: ``{conn_id}_{key_class}_{role}``).
ROLE_CONNECTIONS_ENV = "KEYROTATION_ROLE_CONNECTIONS"


def parse_duration(value: Any) -> timedelta:
    """Parse ``90d``, ``12h``, ``30m``, ``45s``, ``2w`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    raise ValueError(f"not a duration: {value!r} (use e.g. 90d, 12h, 30m, 45s, 2w)")


def human_duration(value: timedelta) -> str:
    """A duration as people write it: ``7 days``, ``1 day 12 hours``, ``90 seconds`` (not ``7 days, 0:00:00``)."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0 seconds"
    parts = []
    for name, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {name}{'s' if count != 1 else ''}")
    return " ".join(parts)


def human_bytes(value: int) -> str:
    """A size as people read it: ``512 B``, ``1.5 MiB``, ``2.0 GiB``."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
#: ``reencryption.chunk_target``: its default and bounds.
CHUNK_TARGET_DEFAULT = timedelta(seconds=60)
CHUNK_TARGET_MIN = timedelta(seconds=10)
CHUNK_TARGET_MAX = timedelta(minutes=30)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RotationPolicy(_Strict):
    schedule: str | None = Field(
        default="@daily", description="Cron expression or preset on which the rotation DAG checks the key."
    )
    cryptoperiod: Duration = Field(description="Maximum age of the current key version.")
    rotate_after: Duration | None = Field(
        default=None, description="Rotate once the current version is this old (default: the cryptoperiod)."
    )

    @model_validator(mode="after")
    def _rotate_within_cryptoperiod(self) -> RotationPolicy:
        if self.cryptoperiod <= timedelta(0):
            raise ValueError("cryptoperiod must be positive")
        if self.rotate_after is not None and self.rotate_after > self.cryptoperiod:
            raise ValueError("rotate_after must not exceed the cryptoperiod")
        return self

    @property
    def due_after(self) -> timedelta:
        return self.rotate_after if self.rotate_after is not None else self.cryptoperiod


class ReencryptionPolicy(_Strict):
    mode: Literal["rewrap", "reencrypt"] = Field(
        default="rewrap",
        description="rewrap: re-wrap the key material with the new KEK version, data files untouched; "
        "reencrypt: rewrite the data with fresh data keys.",
    )
    chunk_size: int | None = Field(
        default=None, ge=1, le=10_000, description="Partitions per mapped task, a fixed count (an override); "
        "default: chunks sized by their estimated work (chunk_target).")
    chunk_target: Duration = Field(
        default=CHUNK_TARGET_DEFAULT, description="Without chunk_size: each mapped task gets about this much "
        "estimated work, from the census (files, bytes, rows) and the mode, so that Airflow's cost per task stays "
        f"a small share whatever the partitions' size ({human_duration(CHUNK_TARGET_MIN)} to "
        f"{human_duration(CHUNK_TARGET_MAX)}; at most 1,024 mapped tasks, Airflow's max_map_length).")
    batch_rows: int = Field(
        default=65_536, ge=1_024, le=4_194_304, description="Rows of a Parquet partition decrypted, checked and "
        "re-encrypted at a time (reencrypt mode, validation): with the 65,536-row row groups keyrotation writes, "
        "this bounds a task's memory whatever the partition's size.")
    catch_up_after: Duration = Field(
        default=timedelta(days=1), description="A scheduled run also re-encrypts every partition still under an "
        "older version once the current version has been the reference this long (the sweep a rotation starts "
        "normally finishes well before): the lifecycle converges even if that sweep's event was lost.")
    behind_after: Duration = Field(
        default=timedelta(days=7), description="Data still under an older version this long after the current "
        "version became the reference is reported as behind (key inventory, compliance report).")


    def chunking(self) -> str:
        """How a sweep is cut into mapped tasks, as the DAG docs say it."""
        if self.chunk_size is not None:
            return f"{self.chunk_size} partitions (reencryption.chunk_size)"
        return (f"about {human_duration(self.chunk_target)} of estimated work each, sized from the census "
                "(reencryption.chunk_target)")

    @field_validator("chunk_target")
    @classmethod
    def _chunk_target_bounds(cls, value: timedelta) -> timedelta:
        if not CHUNK_TARGET_MIN <= value <= CHUNK_TARGET_MAX:
            raise ValueError(f"chunk_target must be from {human_duration(CHUNK_TARGET_MIN)} to "
                             f"{human_duration(CHUNK_TARGET_MAX)}")
        return value


class RetirePolicy(_Strict):
    grace_period: Duration = Field(
        default=timedelta(days=7), description="Minimum time between a rotation and retiring older versions."
    )
    versions_kept: int = Field(default=1, ge=1, description="Most recent versions that stay decryptable.")
    approval_required: bool = Field(default=False, description="Wait for a human approval before retiring.")
    approval_timeout: Duration = Field(default=timedelta(days=7), description="How long the approval may wait.")
    trim: bool = Field(default=False, description="Also delete retired versions from the KMS (permanent).")
    census_timeout: Duration = Field(
        default=timedelta(hours=6), description="How long the census gate waits for re-encryption to finish."
    )
    separate_approver: bool = Field(
        default=False, description="Separation of duties: the person who approves a retirement must not be the "
        "one who triggered the rotation that made the current version (the retirement gate refuses otherwise).")


_EMAIL = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+$")
NotificationEvent = Literal["approval_pending", "failed", "overdue"]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class SmtpChannel(_Strict):
    """Mail through an Airflow ``smtp`` connection (host, port, login, TLS, ``from_email`` in its extra)."""

    conn_id: str = Field(default="smtp_default", min_length=1, description="Airflow smtp connection.")
    to: Annotated[list[str], BeforeValidator(_as_list)] = Field(min_length=1, description="Recipients.")
    cc: Annotated[list[str], BeforeValidator(_as_list)] = Field(default_factory=list, description="Copied.")
    from_email: str | None = Field(default=None, description="Sender (default: the connection's from_email).")

    @field_validator("to", "cc", "from_email")
    @classmethod
    def _addresses(cls, value: list[str] | str | None) -> list[str] | str | None:
        for address in [value] if isinstance(value, str) else value or []:
            if not _EMAIL.match(address):
                raise ValueError(f"not an email address: {address!r}")
        return value


class SlackChannel(_Strict):
    """A Slack Incoming Webhook: the channel is the webhook's, chosen when it is created in Slack."""

    conn_id: str = Field(default="slack_default", min_length=1,
                         description="Airflow slackwebhook connection (the webhook token in its password).")


class Notifications(_Strict):
    """Who hears about what, per key class: an approval waiting, a failed task, a key past policy."""

    smtp: SmtpChannel | None = None
    slack: SlackChannel | None = None
    events: list[NotificationEvent] = Field(
        default_factory=lambda: ["approval_pending", "failed", "overdue"], min_length=1,
        description="approval_pending: a retirement waits for an approval; failed: a rotate__ or retire__ task "
        "(or a reencrypt__ run) failed; overdue: the current version is past its cryptoperiod, or the data is "
        "behind (reencryption.behind_after).")

    @model_validator(mode="before")
    @classmethod
    def _no_bare_on(cls, data: Any) -> Any:
        if isinstance(data, dict) and True in data:
            raise ValueError("unknown key 'on' (YAML reads a bare on as true): list the events under 'events'")
        return data

    @model_validator(mode="after")
    def _a_channel(self) -> Notifications:
        if self.smtp is None and self.slack is None:
            raise ValueError("name at least one channel: smtp, slack")
        return self

    def wants(self, event: str) -> bool:
        return event in self.events


class EventSource(_Strict):
    """A message queue fed by KMS events (e.g. an EventBridge rule on AWS KMS): each message rotates."""

    sqs_queue: str = Field(min_length=1, description="SQS queue URL.")
    aws_conn_id: str = Field(default="aws_default", description="Airflow AWS connection for the queue.")
    region_name: str | None = None


class AwsKeyOptions(_Strict):
    """How a key class maps onto AWS KMS (backend ``aws_kms``)."""

    strategy: Literal["alias", "on_demand"] = Field(
        default="alias",
        description="alias: a new KMS key per version behind the key class alias, old keys disabled and deleted "
        "on retirement; on_demand: AWS rotates the key material of one key, which AWS keeps for good.",
    )
    region_name: str | None = Field(default=None, description="Region (default: the connection's).")
    rotation_period_days: int | None = Field(
        default=None, ge=90, le=2560, description="on_demand: also turn on AWS's automatic rotation every N days."
    )
    deletion_window_days: int = Field(
        default=30, ge=7, le=30, description="alias: days between scheduling a retired key's deletion and the deletion."
    )
    max_requests_per_second: float | None = Field(
        default=None, gt=0, description="Cap on this task's KMS requests per second (the quota is per account)."
    )


class GcpKeyOptions(_Strict):
    """How a key class maps onto Google Cloud KMS (backend ``gcp_kms``)."""

    protection_level: Literal["SOFTWARE", "HSM"] = Field(
        default="SOFTWARE", description="Protection level of the versions a created key gets (HSM versions pass "
        "through PENDING_GENERATION before they are enabled).")
    sync_rotation_schedule: bool = Field(
        default=False, description="Also set Cloud KMS's own rotation_period (= rotation.rotate_after or the "
        "cryptoperiod) and next_rotation_time on the key, so Cloud KMS adds versions even if Airflow is down.")
    destroy_scheduled_duration: Duration = Field(
        default=timedelta(days=30), description="For a created key: how long a destroyed version stays restorable "
        "(Cloud KMS allows 1 to 120 days).")
    impersonation_chain: list[str] | None = Field(
        default=None, description="Service accounts to impersonate, as the google provider's hooks take them.")

    @field_validator("destroy_scheduled_duration")
    @classmethod
    def _destroy_window(cls, value: timedelta) -> timedelta:
        if not timedelta(days=1) <= value <= timedelta(days=120):
            raise ValueError("Cloud KMS allows a destroy_scheduled_duration of 1 to 120 days")
        return value


#: Key class sections that hold one backend's options -> that backend.
_OPTION_SECTIONS = {"aws": "aws_kms", "gcp": "gcp_kms"}
#: Server-side encrypted object formats -> their location's scheme, and what their census needs of the key
#: class (the backend says which formats it can tell the versions of: ``KmsBackend.object_formats``).
_OBJECT_FORMATS = {
    "sse_kms_objects": ("s3://", "backend aws_kms with the alias strategy (the object's SSE-KMS key id tells "
                                 "its version)"),
    "gcs_cmek_objects": ("gs://", "backend gcp_kms (the object's kmsKeyName names its key version)"),
}

#: The roles of a key class's tasks, one connection (and KMS identity) each; every policy generator
#: (keyrotation.policies.vault_transit, .aws_kms, .gcp_kms) writes one policy per role.
Role = Literal["rotate", "reencrypt", "retire", "report"]
ROLES: tuple[str, ...] = get_args(Role)


class KeyClass(_Strict):
    name: str = Field(pattern=_NAME)
    backend: Literal["vault_transit", "aws_kms", "gcp_kms"]
    key_ref: str = Field(min_length=1, description="Key name (Transit), ARN/alias (AWS) or resource name (GCP).")
    conn_id: str = Field(min_length=1, description="Airflow connection that reaches the KMS.")
    connections: dict[Role, str] = Field(
        default_factory=dict,
        description="Per-role Airflow connections (least privilege); a role not listed uses the template in "
        "$KEYROTATION_ROLE_CONNECTIONS if set, else conn_id.",
    )
    mount_point: str = Field(default="transit", description="Transit secrets engine mount (vault_transit).")
    create_if_missing: bool = False
    owner: str = "security"
    rotation: RotationPolicy
    reencryption: ReencryptionPolicy = ReencryptionPolicy()
    retire: RetirePolicy = RetirePolicy()
    events: EventSource | None = Field(default=None, description="Rotate on messages from this queue too.")
    aws: AwsKeyOptions | None = Field(default=None, description="AWS KMS options (backend aws_kms).")
    gcp: GcpKeyOptions | None = Field(default=None, description="Cloud KMS options (backend gcp_kms).")
    kms_pool: str | None = Field(
        default=None, description="Airflow pool for every task that calls the KMS, so that more workers never "
        "mean more concurrent KMS calls than the pool has slots."
    )
    notifications: Notifications | None = Field(
        default=None, description="Mail (SMTP) and Slack notices for this key class; absent: none.")

    @model_validator(mode="after")
    def _backend_options(self) -> KeyClass:
        backend = self.backend_class
        for section, owner in _OPTION_SECTIONS.items():
            if getattr(self, section) is not None and backend.options_section != section:
                raise ValueError(f"the {section} section applies to backend {owner}, not {self.backend}")
        problem = backend.key_class_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def backend_class(self) -> type[KmsBackend]:
        from keyrotation.backends.registry import backend_class

        return backend_class(self.backend)

    @property
    def gcp_options(self) -> GcpKeyOptions:
        return self.gcp or GcpKeyOptions()

    @property
    def aws_options(self) -> AwsKeyOptions:
        return self.aws or AwsKeyOptions()

    @property
    def retires_versions(self) -> bool:
        """False where the KMS keeps old versions for good (AWS on_demand): no retirement, no approval."""
        return self.backend_class.retires_versions(self)

    def config_hash(self) -> str:
        """SHA-256 of the validated key class as canonical JSON: the same settings give the same hash."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def policy_facts(self) -> dict[str, Any]:
        """The policy a decision on this key class is taken under, as every rotation, approval, retirement and
        refusal records it in the ledger (``detail.policy``); durations in seconds."""
        return {
            "cryptoperiod_s": int(self.rotation.cryptoperiod.total_seconds()),
            "grace_period_s": int(self.retire.grace_period.total_seconds()),
            "approval_required": self.retire.approval_required,
            "separate_approver": self.retire.separate_approver,
            "versions_kept": self.retire.versions_kept,
            "config_sha256": self.config_hash(),
        }

    def conn_for(self, role: str) -> str:
        """The Airflow connection of ``role`` (rotate, reencrypt, retire, report): ``connections.<role>``;
        for a role not listed there, the template in ``$KEYROTATION_ROLE_CONNECTIONS`` if set (a deployment
        gives every key class per-role connections without editing its file), else ``conn_id``."""
        if role in self.connections:
            return self.connections[role]
        template = os.environ.get(ROLE_CONNECTIONS_ENV, "").strip()
        if not template:
            return self.conn_id
        try:
            return template.format(conn_id=self.conn_id, key_class=self.name, role=role)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{ROLE_CONNECTIONS_ENV}={template!r} is not a connection id template (fields: "
                              f"{{conn_id}}, {{key_class}}, {{role}}): {type(exc).__name__}: {exc}") from None


# Policy facts (KeyClass.policy_facts) and the direction in which each one weakens the policy: None = a change
# either way is neither weaker nor stronger.
_POLICY_FIELDS: dict[str, tuple[str, str | None]] = {
    "cryptoperiod_s": ("cryptoperiod", "longer"),
    "grace_period_s": ("grace period", "shorter"),
    "approval_required": ("approval required", "off"),
    "separate_approver": ("separate approver", "off"),
    "versions_kept": ("versions kept", "fewer"),
}


def _policy_value(key: str, value: Any) -> str:
    if key.endswith("_s") and isinstance(value, int | float):
        return human_duration(timedelta(seconds=value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def policy_changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, bool]]:
    """What changed between two :meth:`KeyClass.policy_facts`, each as ``(text, weaker)``: e.g.
    ``("grace period 7 days -> 1 minute", True)``. Fewer versions kept counts as weaker (older versions
    are retired sooner). A fact missing on either side (recorded before it existed) is not compared."""
    changes = []
    for key, (label, weaker_when) in _POLICY_FIELDS.items():
        old, new = before.get(key), after.get(key)
        if old is None or new is None or old == new:
            continue
        weaker = {"longer": new > old, "shorter": new < old, "fewer": new < old,
                  "off": bool(old) and not new}.get(weaker_when or "", False)
        changes.append((f"{label} {_policy_value(key, old)} -> {_policy_value(key, new)}", weaker))
    return changes


class Dataset(_Strict):
    name: str = Field(pattern=_NAME)
    location: str = Field(min_length=1, description="Local path, s3://bucket/prefix or another pyarrow filesystem "
                          "URI of the dataset root.")
    format: Literal["parquet", "sse_kms_objects", "gcs_cmek_objects", "sql_table"] = Field(
        default="parquet", description="parquet: Parquet partitions with encrypted columns (PME); sse_kms_objects: "
        "any S3 objects encrypted with SSE-KMS under the key class's key (backend aws_kms, alias strategy); "
        "gcs_cmek_objects: any GCS objects encrypted with the key class's key as CMEK (backend gcp_kms); "
        "sql_table: encrypted columns of a PostgreSQL table (location: a SQLAlchemy URL, or conn_id).")
    conn_id: str | None = Field(default=None, description="Airflow connection for the storage (s3:// locations: "
                                "an aws connection, gs:// a google_cloud_platform one; default: the key class's "
                                "conn_id when its backend is of the same cloud).")
    partitioning: str = Field(default="dt", pattern=r"^[a-z_]+$", description="Partition directory key: dt=YYYY-MM-DD.")
    encrypted_columns: list[str] = Field(default_factory=list, validate_default=True,
                                        description="Columns to encrypt (parquet, sql_table).")
    table: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="sql_table: the table.")
    primary_key: str = Field(default="id", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="sql_table: primary key column (keyset pagination, AAD binding).")
    partition_column: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                         description="sql_table: date or timestamp column; a partition is a day.")
    batch_size: int = Field(default=5000, ge=1, le=100_000, description="sql_table: rows per transaction.")
    create_key_id_index: bool = Field(
        default=True, description="sql_table: create the key-id index of each encrypted column when it is missing "
        "(CREATE INDEX CONCURRENTLY, writes go on). false: never create one (a DBA creates it, or the census scans "
        "every value); an index already there is used either way.")
    schedule: str | None = Field(default="@daily", description="Cron for the per-partition re-encryption DAG.")
    start_date: str = Field(default="2024-01-01", pattern=r"^\d{4}-\d{2}-\d{2}$")

    @field_validator("encrypted_columns")
    @classmethod
    def _columns_for_parquet(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("format", "parquet") in ("parquet", "sql_table") and not value:
            raise ValueError(f"a {info.data.get('format', 'parquet')} dataset must name at least one encrypted column")
        return value


class KeyClassConfig(_Strict):
    """One key class and the datasets it protects, as loaded from one file."""

    key_class: KeyClass
    datasets: list[Dataset] = []
    source: str = ""

    @model_validator(mode="after")
    def _unique_datasets(self) -> KeyClassConfig:
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique, repeated: {', '.join(dupes)}")
        for d in self.datasets:
            if d.format in _OBJECT_FORMATS:
                scheme, needs = _OBJECT_FORMATS[d.format]
                if d.format not in self.key_class.backend_class.object_formats(self.key_class):
                    raise ValueError(f"dataset {d.name}: {d.format} needs {needs}")
                if not d.location.startswith(scheme):
                    raise ValueError(f"dataset {d.name}: {d.format} needs a {scheme} location")
            if d.format == "sql_table" and not (d.table and d.partition_column):
                raise ValueError(f"dataset {d.name}: sql_table needs table and partition_column")
        return self

    def dataset(self, name: str) -> Dataset:
        for dataset in self.datasets:
            if dataset.name == name:
                return dataset
        raise ConfigError(f"{self.source}: key class {self.key_class.name!r} has no dataset {name!r}")


def config_dir() -> Path:
    """The folder of key class files: ``$KEYROTATION_CONFIG_DIR``; else, in a checkout,
    ``include/config/key_classes``; else (the installed package) ``key_classes`` in Airflow's DAG folder,
    ``$AIRFLOW__CORE__DAGS_FOLDER``, else ``$AIRFLOW_HOME/dags``, else ``~/airflow/dags``."""
    env = os.environ.get("KEYROTATION_CONFIG_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[1] / "config" / "key_classes"
    if checkout.is_dir():
        return checkout
    # Read from the environment, not Airflow's configuration: this module does not import Airflow. Where
    # airflow.cfg alone moves the DAG folder, KEYROTATION_CONFIG_DIR says where the key classes are.
    dags = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    if not dags:
        dags = str(Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow") / "dags")
    return Path(dags) / "key_classes"


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set and has no default")

        return _ENV.sub(repl, value)
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v, where) for k, v in value.items()}
    return value


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def load_key_class_file(path: str | Path) -> KeyClassConfig:
    """Load and validate one key class file; raise :class:`ConfigError` naming file, key class and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: key class config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'key_class' and 'datasets'")
    name = (raw.get("key_class") or {}).get("name", path.stem) if isinstance(raw.get("key_class"), dict) else path.stem
    raw = _expand_env(raw, f"{path} (key class {name!r})")
    try:
        config = KeyClassConfig.model_validate({**raw, "source": str(path)})
    except ValidationError as exc:
        problems = "; ".join(f"field {_field_path(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{path}: key class {name!r}: {problems}") from None
    if config.key_class.name != path.stem:
        raise ConfigError(
            f"{path}: key class {config.key_class.name!r}: field key_class.name must match the file name "
            f"({path.stem!r})"
        )
    return config


def load_key_class(name: str, directory: str | Path | None = None) -> KeyClassConfig:
    """Load the key class ``name`` from ``<config dir>/<name>.yaml``."""
    return load_key_class_file(Path(directory or config_dir()) / f"{name}.yaml")


def list_key_classes(directory: str | Path | None = None) -> list[str]:
    """Names of the key class files in the config folder, sorted."""
    return sorted(p.stem for p in Path(directory or config_dir()).glob("*.yaml"))
