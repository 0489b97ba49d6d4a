"""Operator of the compliance report DAG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from keyrotation.config import list_key_classes
from keyrotation.errors import KeyRotationError
from keyrotation.ledger import Ledger
from keyrotation.report import KeyClassEvidence, write_report
from keyrotation_airflow.runtime import key_class_runtime


class ComplianceReportOperator(BaseOperator):
    """
    Write the compliance report (CSV files and ``report.html``) for every key class, from the ledger,
    each KMS's metadata and each dataset's census. A key class whose config or KMS cannot be read is
    named in the log and left out, and the task fails after writing the report for the others.

    :param output_dir: Folder for the report; default ``$KEYROTATION_HOME/reports/<timestamp>``. (templated)
    :param key_classes: Key classes to report on; default: every key class file. (templated)
    """

    template_fields: Sequence[str] = ("output_dir", "key_classes")

    def __init__(self, *, output_dir: str | None = None, key_classes: list[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output_dir = output_dir
        self.key_classes = key_classes

    def execute(self, context: Any) -> str:
        evidence, problems = [], []
        for name in self.key_classes or list_key_classes():
            try:
                rt = key_class_runtime(name, "report")
                evidence.append(KeyClassEvidence(rt.config.key_class, rt.backend.key_state(), rt.censuses()))
            except (KeyRotationError, OSError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
                self.log.error("key class %s left out of the report: %s", name, exc)
        home = Path(os.environ.get("KEYROTATION_HOME", "var"))
        out = self.output_dir or str(home / "reports" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
        path = write_report(evidence, Ledger(), out)
        self.log.info("compliance report for %d key classes: %s", len(evidence), path)
        if problems:
            raise KeyRotationError(f"report written to {path} without {len(problems)} key classes: "
                                   + "; ".join(problems))
        return str(path)
