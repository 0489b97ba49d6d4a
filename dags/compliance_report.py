"""Airflow DAG: the compliance report over every key class, from the ledger, KMS metadata and census."""

from datetime import datetime

from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable

from keyrotation_airflow.operators.report import ComplianceReportOperator
from keyrotation_factory import AUDIT_ASSET

with DAG(
    dag_id="compliance_report",
    description="Compliance report (CSV + HTML) for every key class",
    # Daily, and after every retirement or finished re-encryption (the asset chain ends here).
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("@daily", timezone="UTC"), assets=[AUDIT_ASSET]),
    start_date=datetime(2024, 1, 1),
    catchup=False,
    tags=["keyrotation", "report"],
    doc_md="Writes `key_classes.csv`, `coverage.csv`, `retirements.csv` and `report.html` under "
    "`$KEYROTATION_HOME/reports/<timestamp>/`: per key class the current version, its age against the "
    "cryptoperiod, data coverage per version and retirements, from evidence (ledger, KMS, key material).",
):
    ComplianceReportOperator(task_id="write_report")
