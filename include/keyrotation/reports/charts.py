"""The report's charts (matplotlib, no display needed): key age against the cryptoperiod, data
coverage per version over time, and runs by outcome. Each is a PNG as bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import pandas as pd  # noqa: E402

CHART_DPI = 110  # the PDF draws charts at this many pixels per inch: their true size


def _png(fig) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=CHART_DPI)
    plt.close(fig)
    return buf.getvalue()


def _empty(ax, text: str) -> None:  # noqa: ANN001
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def key_age(inventory: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * max(1, len(inventory))))
    if not len(inventory):
        _empty(ax, "no key classes")
    else:
        names = list(inventory["key_class"])
        ages = inventory["age_days"].fillna(0).astype(float)
        periods = inventory["cryptoperiod_days"].astype(float)
        colors = ["#c0392b" if a > p else "#2e86c1" for a, p in zip(ages, periods, strict=True)]
        ax.barh(names, ages, color=colors, label="age of the current version")
        ax.scatter(periods, names, marker="|", s=400, color="#222", label="cryptoperiod", zorder=3)
        ax.set_xlabel("days")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Key age vs cryptoperiod")
    return _png(fig)


def coverage_series(history: pd.DataFrame) -> pd.DataFrame:
    """Partitions per ``<key class> v<version>`` (columns) at each time of the history (index).

    The history has rows only at the times its key class changed: each (key class, dataset, version)
    keeps its last value until its next row (0 before its first), and is then summed per series.
    """
    if not len(history):
        return pd.DataFrame()
    wide = history.pivot_table(index="time", columns=["key_class", "dataset", "version"], values="partitions",
                               aggfunc="last").sort_index().ffill().fillna(0).astype(int)
    names = [f"{key_class} v{version}" for key_class, _dataset, version in wide.columns]
    return wide.T.groupby(names).sum().T


def coverage_over_time(history: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    if not len(history):
        _empty(ax, "no partition changes on record")
    else:
        frame = coverage_series(history)
        for series in frame.columns:
            ax.step(pd.to_datetime(frame.index), frame[series], where="post", marker="o", label=series)
        ax.set_ylabel("partitions")
        ax.legend(fontsize=8, ncol=2)
        fig.autofmt_xdate()
    ax.set_title("Data coverage per key version over time")
    return _png(fig)


def runs_by_outcome(runs: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3))
    if not len(runs):
        _empty(ax, "no Airflow runs read")
    else:
        kind = runs["dag_id"].str.split("__").str[0]
        table = pd.crosstab(kind, runs["state"])
        colors = {"success": "#27ae60", "failed": "#c0392b", "running": "#f39c12", "queued": "#95a5a6"}
        bottom = pd.Series(0, index=table.index)
        for state in table.columns:
            ax.bar(table.index, table[state], bottom=bottom, label=state, color=colors.get(state, "#7f8c8d"))
            bottom += table[state]
        ax.set_ylabel("runs")
        ax.legend(fontsize=8)
    ax.set_title("Runs by outcome")
    return _png(fig)


def all_charts(tables: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    return {
        "key_age.png": key_age(tables["key_inventory"]),
        "coverage_over_time.png": coverage_over_time(tables["coverage_history"]),
        "runs_by_outcome.png": runs_by_outcome(tables["runs"]),
    }
