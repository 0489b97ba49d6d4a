"""Running the DAGs in a test: a key class's DAGs, a run's state, its task instances, and a task context for
calling an operator directly."""

from __future__ import annotations

from typing import Any


def key_class_dags(name: str) -> dict:
    from keyrotation_factory import key_class_dags as build

    return build(name)


def state(dag_run) -> str:
    return getattr(dag_run.state, "value", dag_run.state)


def task_instances(dag_run) -> dict[str, Any]:
    """``task_id[map_index]`` (or ``task_id`` for an unmapped task) -> the run's task instance."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.settings import Session

    tis = Session().query(TaskInstance).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id).all()
    return {f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: ti for ti in tis}


def task_states(dag_run) -> dict[str, str]:
    return {name: str(ti.state) for name, ti in task_instances(dag_run).items()}


def task_context(dag_id: str, task_id: str) -> dict:
    """A context for ``operator.execute``: a task instance with ids and no XCom."""
    class TI:
        def __init__(self):
            self.dag_id, self.run_id, self.task_id, self.try_number = dag_id, "manual__test", task_id, 1

        def xcom_pull(self, **_kwargs):
            return None

    return {"ti": TI(), "dag_run": None}


def seed_and_rotate_through_dags(rt: Any, dags: dict, dataset: str, partitions: list[str],
                                 reason: str = "test: rotate") -> None:
    """The first version by the rotate DAG, ``partitions`` written under it, then a forced rotation by the DAG."""
    from helpers import seed

    rotate = dags[f"rotate__{rt.name}"]
    assert state(rotate.test(run_conf={"force": False, "reason": "test: first version"})) == "success"
    seed(rt, dataset, partitions)
    assert state(rotate.test(run_conf={"force": True, "reason": reason})) == "success"
