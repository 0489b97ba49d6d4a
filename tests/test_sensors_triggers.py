"""Key version sensor (classic and deferrable) and its trigger, against the real OpenBao."""

from __future__ import annotations

import asyncio
import importlib

import pytest

from helpers import runtime
from keyrotation_airflow.sensors.key_version import KeyVersionReadySensor
from keyrotation_airflow.triggers.key_version import KeyVersionReadyTrigger


def _first_event(trigger, timeout=20):
    async def first():
        return await anext(trigger.run())

    return asyncio.run(asyncio.wait_for(first(), timeout))


def test_trigger_serializes_to_an_importable_class_without_secrets():
    trigger = KeyVersionReadyTrigger("pii", 3, poll_interval=0.5)
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert kwargs == {"key_class": "pii", "version": 3, "poll_interval": 0.5, "timeout": None}
    assert rebuilt.serialize() == (classpath, kwargs)


def test_trigger_fires_when_the_version_becomes_usable(make_key_class, vault):
    rt = runtime(make_key_class(name="trig"), vault)
    rt.backend.create_key()
    assert _first_event(KeyVersionReadyTrigger("trig", 1, 0.1)).payload == {"status": "ready", "version": 1}

    async def rotate_later():
        await asyncio.sleep(0.5)
        await asyncio.to_thread(rt.backend.rotate)

    async def wait_for_v2():
        task = asyncio.create_task(rotate_later())
        event = await asyncio.wait_for(anext(KeyVersionReadyTrigger("trig", 2, 0.1).run()), 20)
        await task
        return event

    assert asyncio.run(wait_for_v2()).payload == {"status": "ready", "version": 2}


def test_trigger_reports_errors_as_events():
    event = _first_event(KeyVersionReadyTrigger("nosuchclass", 1, 0.1))
    assert event.payload["status"] == "error" and "nosuchclass" in event.payload["message"]


def test_sensor_pokes_and_defers(make_key_class, vault):
    from airflow.sdk.exceptions import AirflowException, TaskDeferred

    rt = runtime(make_key_class(name="sens"), vault)
    rt.backend.create_key()
    sensor = KeyVersionReadySensor(task_id="wait", key_class="sens", version="1", timeout=60)
    assert sensor.poke({}) is True
    assert KeyVersionReadySensor(task_id="w2", key_class="sens", version=2).poke({}) is False

    deferring = KeyVersionReadySensor(task_id="w3", key_class="sens", version=2, deferrable=True, timeout=60)
    with pytest.raises(TaskDeferred) as deferred:
        deferring.execute({})
    assert isinstance(deferred.value.trigger, KeyVersionReadyTrigger)
    assert deferred.value.method_name == "execute_complete"
    deferring.execute_complete({}, {"status": "ready", "version": 2})
    with pytest.raises(AirflowException, match="waiting for v2 failed"):
        deferring.execute_complete({}, {"status": "error", "message": "boom"})
