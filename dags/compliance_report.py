"""Airflow DAG: the monthly compliance report over every key class, from the ledger, KMS metadata,
the census and Airflow's run history."""

from datetime import datetime

from airflow.sdk import DAG, AssetOrTimeSchedule, CronDataIntervalTimetable, Param

from keyrotation_airflow.dags import AUDIT_ASSET
from keyrotation_airflow.operators.report import ComplianceReportOperator

DOC = """
### Compliance report

Answers the questions auditors ask (PCI DSS 3.6/3.7, NIST SP 800-57, SOC 2, ISO 27001) from evidence:
the key inventory, each version's age against the cryptoperiod and NIST's usage periods, rotations on
time or late, data coverage per version (now and over time), retirements with their approver and
deletion date, failures and retries, runs and who triggered them, and the UI's event log. Findings are
PASS / WARN / FAIL per control, each linked to its evidence rows.

- **Monthly** (data interval = the month; backfill any past month: `airflow backfill create --dag-id
  compliance_report --from-date 2025-01-01 --to-date 2025-06-30`), after every retirement or
  re-encryption (the `keyrotation.audit` asset: month to date), or by hand with a **period**.
- After audit events the run reports on the key classes they are about (the event's `key_class`, or
  the key classes with ledger events since their last report), leaving out each key class whose
  previous report is younger than **min_interval_minutes** (default 60; 0: no limit), recorded in the
  ledger as `report_skipped` with the reason; with none left the run is skipped. Monthly, backfill and
  manual runs always report on every key class.
- Each report names the previous one (its path and the SHA-256 of its HTML, PDF and content), so the
  reports form a chain.
- Writes `report.html`, `report.pdf`, charts and every table as CSV and Parquet to **output**
  (a folder, `s3://` or `gs://`), and records each artifact's path and SHA-256 in the ledger.
- Airflow's run history comes from the REST API through the connection `keyrotation_airflow_api`
  (http: the API server's URL and a read-only user); without it the report says so.
"""

with DAG(
    dag_id="compliance_report",
    description="Monthly compliance report (HTML, PDF, CSV/Parquet) for every key class",
    schedule=AssetOrTimeSchedule(timetable=CronDataIntervalTimetable("@monthly", timezone="UTC"),
                                 assets=[AUDIT_ASSET]),
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=False,  # reports after audit events and monthly from the start, as an auditor expects
    tags=["keyrotation", "report"],
    doc_md=DOC,
    render_template_as_native_obj=True,
    params={
        "period_start": Param(None, type=["null", "string"], format="date", title="Period start",
                              section="Period", description="First day reported on; empty: the run's month."),
        "period_end": Param(None, type=["null", "string"], format="date", title="Period end",
                            section="Period", description="Last day reported on (inclusive)."),
        "output": Param(None, type=["null", "string"], title="Output", section="Output",
                        description="Folder, s3://bucket/prefix or gs://bucket/prefix; empty: "
                                    "$KEYROTATION_HOME/reports/<period>_<time>."),
        "output_conn_id": Param(None, type=["null", "string"], title="Output connection", section="Output",
                                description="aws connection for an s3:// output."),
        "min_interval_minutes": Param(60, type="integer", minimum=0, title="Minimum interval after audit events",
                                      section="Rate",
                                      description="An audit-triggered run leaves out each key class whose "
                                                  "previous report is younger than this (minutes); 0: no limit. "
                                                  "Other runs always cover every key class."),
    },
):
    ComplianceReportOperator(task_id="write_report", period_start="{{ params.period_start }}",
                             period_end="{{ params.period_end }}", output_dir="{{ params.output }}",
                             output_conn_id="{{ params.output_conn_id }}",
                             min_interval_minutes="{{ params.min_interval_minutes }}")
