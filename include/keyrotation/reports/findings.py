"""The findings of the compliance report: one PASS / WARN / FAIL per control and key class, each
pointing at the evidence rows it rests on. Controls follow the questions auditors ask (PCI DSS
3.6/3.7, NIST SP 800-57, SOC 2, ISO 27001)."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from keyrotation.reports.evidence import NIST_ORIGINATOR_USAGE, NIST_RECIPIENT_EXTRA, Evidence

CONTROLS = {
    "INV-1": "The master key exists in the KMS (key inventory)",
    "CP-1": "The current version is within the key class's cryptoperiod",
    "CP-2": "The cryptoperiod is within NIST SP 800-57's originator-usage period (2 years)",
    "CP-3": "No version still decrypts beyond the recipient-usage period (originator + 3 years)",
    "ROT-1": "Every rotation in the period came within the cryptoperiod of the previous version",
    "ENC-1": "No retired version can still encrypt",
    "DATA-1": "All data is under the current version",
    "RET-1": "Every retirement had the approval its policy requires",
    "POL-1": "No decision was taken under a policy weaker than the one in force before it",
    "SOD-1": "Separation of duties: who rotated and who approved each retirement",
    "OPS-1": "Failed and retried work in the period",
    "LOG-1": "The audit trail is complete: ledger hash chain intact, Airflow run history read",
}


def _ids(frame: pd.DataFrame) -> str:
    return " ".join(frame["id"]) if len(frame) else ""


def _finding(control: str, key_class: str, status: str, detail: str, evidence: str = "") -> dict:
    return {"control": control, "title": CONTROLS[control], "key_class": key_class, "status": status,
            "detail": detail, "evidence": evidence}


def _policy_finding(name: str, changes: pd.DataFrame) -> dict:
    weaker = changes[changes["weaker"] != ""]
    if len(weaker):
        return _finding("POL-1", name, "FAIL", f"{len(weaker)} of {len(changes)} policy changes in the period "
                        "weakened the policy before a decision: " + "; ".join(
                            f"{r.decision} at {r.time} under {r.weaker} (config {r.from_config[:12]} -> "
                            f"{r.to_config[:12]})" for r in weaker.itertuples()), _ids(weaker))
    return _finding("POL-1", name, "PASS", f"{len(changes)} policy changes in the period, none weaker",
                    _ids(changes))


def _duty_finding(name: str, retired: pd.DataFrame) -> dict:
    same = retired[(retired["approved_by"] != "") & (retired["approved_by"] == retired["rotated_by"])]
    pairs = "; ".join(f"v<{int(r.versions_below)}: rotated by {r.rotated_by or 'a schedule / not recorded'}, "
                      f"approved by {r.approved_by or 'nobody'}" for r in retired.itertuples())
    if len(same):
        required = same[same["separate_approver"].astype(bool)]
        return _finding("SOD-1", name, "FAIL" if len(required) else "WARN",
                        f"{len(same)} retirements approved by the person who rotated"
                        + (" although retire.separate_approver requires another" if len(required)
                           else " (retire.separate_approver is off)") + f": {pairs}", _ids(same))
    return _finding("SOD-1", name, "PASS", f"{len(retired)} retirements, none approved by the rotator"
                    + (f": {pairs}" if pairs else ""), _ids(retired))


def findings(ev: Evidence) -> pd.DataFrame:
    t = ev.tables
    inv, ver, rot, cov, ret, fail = (t["key_inventory"], t["versions"], t["rotations"], t["coverage"],
                                     t["retirements"], t["failures"])
    pol = t["policy_changes"]
    out: list[dict] = []
    for _, key in inv.iterrows():
        name = key["key_class"]
        mine = inv[inv["key_class"] == name]
        out.append(_finding("INV-1", name, "PASS" if key["exists"] else "FAIL",
                            f"{key['key_ref']} ({key['backend']}, {key['algorithm']})" if key["exists"]
                            else f"{key['key_ref']} does not exist in the KMS", _ids(mine)))

        period = int(key["cryptoperiod_days"])
        age = key["age_days"]
        if pd.isna(age):
            out.append(_finding("CP-1", name, "FAIL", "no current version on record", _ids(mine)))
        else:
            out.append(_finding("CP-1", name, "PASS" if age <= period else "FAIL",
                                f"v{key['current_version']} is {age:.1f} days old; cryptoperiod {period} days",
                                _ids(mine)))
        nist = NIST_ORIGINATOR_USAGE.days
        out.append(_finding("CP-2", name, "PASS" if period <= nist else "FAIL",
                            f"cryptoperiod {period} days; originator-usage period at most {nist} days", _ids(mine)))

        versions = ver[(ver["key_class"] == name) & (ver["status"] == "enabled")]
        limit = (min(timedelta(days=period), NIST_ORIGINATOR_USAGE) + NIST_RECIPIENT_EXTRA).days
        too_old = versions[versions["age_days"].fillna(0) > limit]
        out.append(_finding("CP-3", name, "FAIL" if len(too_old) else "PASS",
                            f"{len(too_old)} decryptable versions older than {limit} days" if len(too_old)
                            else f"every decryptable version is younger than {limit} days",
                            _ids(too_old if len(too_old) else versions)))

        mine_rot = rot[(rot["key_class"] == name) & rot["in_period"]]
        late = mine_rot[mine_rot["on_time"] == False]  # noqa: E712 - pandas element-wise comparison
        if len(late):
            out.append(_finding("ROT-1", name, "FAIL", f"{len(late)} of {len(mine_rot)} rotations in the period "
                                f"came later than {period} days after the previous version: "
                                + ", ".join(f"v{int(r.to_version)} after {r.days_since_previous} days"
                                            for r in late.itertuples()), _ids(late)))
        else:
            out.append(_finding("ROT-1", name, "PASS", f"{len(mine_rot)} rotations in the period, all on time",
                                _ids(mine_rot)))

        retired_can_encrypt = key["min_decryption_version"] > 1 and \
            key["min_encryption_version"] < key["min_decryption_version"]
        out.append(_finding("ENC-1", name, "FAIL" if retired_can_encrypt else "PASS",
                            f"min_encryption_version v{key['min_encryption_version']}, min_decryption_version "
                            f"v{key['min_decryption_version']}", _ids(mine)))

        mine_cov = cov[cov["key_class"] == name]
        old = mine_cov[~mine_cov["current"].astype(bool)]
        partitions = int(old["partitions"].sum()) if len(old) else 0
        out.append(_finding("DATA-1", name, ("FAIL" if key["behind"] else "WARN") if partitions else "PASS",
                            (key["behind"] or f"{partitions} partitions under older versions (or unreadable)")
                            if partitions
                            else f"{int(mine_cov['partitions'].sum()) if len(mine_cov) else 0} partitions, all "
                                 f"under v{key['current_version']}", _ids(old if partitions else mine_cov)))

        mine_ret = ret[ret["key_class"] == name]
        retired = mine_ret[mine_ret["event"] == "versions_retired"]
        impossible = mine_ret[mine_ret["event"] == "retirement_not_possible"]
        unapproved = retired[retired["approval_required"].astype(bool) & (retired["approved_by"] == "")]
        if len(unapproved):
            out.append(_finding("RET-1", name, "FAIL", f"{len(unapproved)} retirements without the required approval",
                                _ids(unapproved)))
        elif len(impossible) and not len(retired):
            out.append(_finding("RET-1", name, "WARN", "old versions cannot be retired on this KMS; recorded "
                                f"{len(impossible)} times with the census", _ids(impossible)))
        else:
            approved = ", ".join(sorted(set(retired["approved_by"]) - {""})) or "not required"
            out.append(_finding("RET-1", name, "PASS", f"{len(retired)} retirements in the period; approved by: "
                                f"{approved}", _ids(mine_ret)))
        out.append(_policy_finding(name, pol[pol["key_class"] == name]))
        out.append(_duty_finding(name, retired))

    key_dags = {f"{p}{n}" for n in inv["key_class"] for p in ("rotate__", "retire__")}
    mine_fail = fail[fail["key_class"].isin(list(inv["key_class"])) | fail["dag_id"].isin(list(key_dags))
                     | fail["dag_id"].str.startswith("reencrypt__")]
    out.append(_finding("OPS-1", "(all)", "WARN" if len(mine_fail) else "PASS",
                        f"{len(mine_fail)} failed or retried items in the period" if len(mine_fail)
                        else "no failure or retry in the period", _ids(mine_fail)))
    if not ev.ledger_ok:
        out.append(_finding("LOG-1", "(all)", "FAIL", f"ledger: {ev.ledger_detail}"))
    elif ev.history_error:
        out.append(_finding("LOG-1", "(all)", "WARN", f"ledger: {ev.ledger_detail}; Airflow run history not read: "
                                                      f"{ev.history_error}"))
    else:
        out.append(_finding("LOG-1", "(all)", "PASS", f"ledger: {ev.ledger_detail}; Airflow history: "
                            f"{len(t['runs'])} runs, {len(t['ui_actions'])} UI actions",
                            _ids(t["runs"].head(20))))
    frame = pd.DataFrame(out, columns=["control", "title", "key_class", "status", "detail", "evidence"])
    frame.insert(0, "id", [f"find-{i}" for i in range(1, len(frame) + 1)])
    return frame
