"""The operator's decisions (reconcile.decide) in a simulated world: no cluster, every rule checked."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from reflection_operator.jobs import job_name
from reflection_operator.spec import Problem

from importer.contract import RunNumbers, ShardSummary

# The simulated world's names, set by the fixture below (the world lives in conftest.py).
World: Any
T0: datetime
RUN0: str
base_spec: Callable[..., dict[str, Any]]
iso: Callable[[datetime], str]


@pytest.fixture(autouse=True)
def _world_names(make_world):
    """The simulated world's names as module globals, to keep the tests short."""
    global World, T0, RUN0, base_spec, iso
    World, T0, RUN0, base_spec, iso = make_world, make_world.T0, make_world.RUN0, make_world.base_spec, make_world.iso


def reasons(plan) -> list[str]:
    return [e.reason for e in plan.events]


def condition(status, kind):
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_run_once_starts_one_job_and_reports_pending_then_running_then_succeeded():
    world = World()
    plan = world.step()
    assert [c.request.name for c in plan.create] == [f"nightly-{RUN0}-1-0"]
    assert plan.reset_summary and plan.starts_jobs
    assert reasons(plan) == ["RunStarted"]
    assert plan.counters == ["started"]
    assert world.status["phase"] == "Pending"
    assert world.status["memory"] == "512Mi" and world.status["attempt"] == 1
    assert world.status["active"][0]["name"] == f"nightly-{RUN0}-1-0"
    assert condition(world.status, "Ready")["status"] == "True"

    job = f"nightly-{RUN0}-1-0"
    world.start_pod(job)
    # Totals (files_done, chunks) count earlier runs too; progress is this run's.
    so_far = RunNumbers(files_read=1, files_unchanged=2, chunks=12, messages=30)
    world.summary = {0: ShardSummary(files_total=10, files_done=8, chunks=40, phase="Running", run=so_far)}
    plan = world.step()
    assert not plan.create and not plan.events
    assert world.status["phase"] == "Running"
    assert (world.status["progress"], world.status["percent"]) == ("3/10", 30)
    assert (world.status["runNumbers"]["chunks"], world.status["chunks"]) == (12, 40)

    world.advance(20)
    done = RunNumbers(files_read=1, files_unchanged=9, chunks=12, messages=30, skipped={"bad_json": 2}, seconds=19)
    world.summary = {0: ShardSummary(files_total=10, files_done=10, chunks=90, phase="Succeeded", run=done)}
    world.end_pod(job, 0)
    plan = world.step()
    assert reasons(plan) == ["RunSucceeded"] and plan.counters == ["succeeded"]
    message = plan.events[0].message
    assert "1 files read, 9 unchanged, 0 failed, 30 messages, 12 chunks written, skipped lines: bad_json 2" in message
    assert "totals: 10 of 10 files imported, 90 chunks" in message
    assert world.status["runNumbers"] == {
        "filesRead": 1,
        "filesUnchanged": 9,
        "filesFailed": 0,
        "messages": 30,
        "chunks": 12,
        "skippedLines": [{"reason": "bad_json", "lines": 2}],
        "seconds": 19.0,
    }
    assert world.status["phase"] == "Succeeded"
    assert world.status["completionTime"] == iso(world.now)
    assert world.status["lastSuccessfulTime"] == iso(world.now)
    assert world.status["active"] == [] and world.status["nextScheduleTime"] is None
    assert condition(world.status, "Running")["reason"] == "RunSucceeded"

    # Nothing more happens to a finished run-once ImportRun.
    world.advance(3600)
    plan = world.step()
    assert not plan.create and not plan.delete and not plan.events and plan.requeue_after is None


def test_deciding_twice_creates_the_same_job_names():
    """A restarted operator that lost its status decides the same names again (AlreadyExists: adopted)."""
    world = World()
    first = world.step(apply=False)
    second = world.step(apply=False)
    assert [c.request.name for c in first.create] == [c.request.name for c in second.create]


def test_a_job_not_in_the_status_is_adopted_not_duplicated():
    world = World()
    world.step()
    world.status = {}  # the status patch was lost when the operator stopped
    world.start_pod(f"nightly-{RUN0}-1-0")
    plan = world.step()
    assert not plan.create
    assert reasons(plan) == ["RunAdopted"]
    assert world.status["run"]["id"] == RUN0 and world.status["phase"] == "Running"


def test_oom_kill_retries_with_more_memory_then_gives_up_naming_the_limits():
    world = World(base_spec(resources={"memory": "400Mi"}, memoryRetry={"factor": 1.5, "maxAttempts": 3}))
    world.step()
    world.end_pod(f"nightly-{RUN0}-1-0", 137, "OOMKilled")
    plan = world.step()
    assert [c.request.name for c in plan.create] == [f"nightly-{RUN0}-2-0"]
    assert plan.create[0].request.memory == 600 << 20
    assert not plan.reset_summary  # a retry resumes: the summary stays
    assert reasons(plan) == ["OOMKilled", "AttemptStarted"] and plan.counters == ["oom_retries"]
    assert world.status["memory"] == "600Mi" and world.status["attempt"] == 2
    assert world.status["lastFailure"]["reason"] == "OOMKilled"
    assert "600Mi" in world.status["lastFailure"]["message"]
    assert condition(world.status, "MemoryRaised")["status"] == "True"

    world.end_pod(f"nightly-{RUN0}-2-0", 86)  # the importer's own memory-budget exit
    plan = world.step()
    assert plan.create[0].request.memory == 900 << 20
    assert world.status["lastFailure"]["reason"] == "MemoryBudgetExceeded"

    world.end_pod(f"nightly-{RUN0}-3-0", 137, "OOMKilled")
    plan = world.step()
    assert not plan.create and plan.counters == ["failed"]
    assert world.status["phase"] == "Failed"
    message = world.status["lastFailure"]["message"]
    assert "400Mi, 600Mi, 900Mi" in message and "maxAttempts=3" in message


def test_oom_at_max_memory_fails_at_once():
    world = World(base_spec(resources={"memory": "1Gi"}, memoryRetry={"maxMemory": "1Gi"}))
    world.step()
    world.end_pod(f"nightly-{RUN0}-1-0", 137, "OOMKilled")
    plan = world.step()
    assert not plan.create
    assert world.status["phase"] == "Failed"
    assert "maxMemory=1Gi" in world.status["lastFailure"]["message"]


def test_other_failures_back_off_then_fail_with_the_last_log_lines():
    world = World(base_spec(failureRetry={"maxRetries": 1, "backoffSeconds": 30}))
    world.step()
    world.end_pod(f"nightly-{RUN0}-1-0", 1, message="Traceback ...\nConnectionError: qdrant unreachable")
    plan = world.step()
    assert not plan.create and reasons(plan) == ["RetryingAfterError"]
    assert plan.requeue_after == 30
    assert world.status["run"]["state"] == "BackingOff" and world.status["phase"] == "Running"

    world.advance(10)
    assert not world.step().create  # still backing off
    world.advance(25)
    plan = world.step()
    assert [c.request.name for c in plan.create] == [f"nightly-{RUN0}-2-0"]
    assert plan.create[0].request.memory == 512 << 20

    world.end_pod(f"nightly-{RUN0}-2-0", 1, message="ConnectionError: qdrant unreachable")
    plan = world.step()
    assert not plan.create and world.status["phase"] == "Failed"
    assert "qdrant unreachable" in world.status["lastFailure"]["message"]
    assert "maxRetries=1" in world.status["lastFailure"]["message"]


def test_a_failed_job_waits_briefly_for_its_pods_last_status():
    world = World()
    world.step()
    world.start_pod(f"nightly-{RUN0}-1-0")
    world.end_pod(f"nightly-{RUN0}-1-0", 137, "OOMKilled", pod_status=False)
    plan = world.step()
    assert not plan.create and not plan.events and plan.requeue_after == 1.0
    world.advance(20)  # the Pod's status never came: decide without it
    plan = world.step()
    assert world.status["run"]["state"] == "BackingOff"


def test_a_retry_uses_the_spec_the_run_started_with():
    world = World()
    world.step()
    world.raw_spec = base_spec(image="other:2")  # edited while the run is going
    world.end_pod(f"nightly-{RUN0}-1-0", 137, "OOMKilled")
    plan = world.step()
    assert plan.create[0].spec.image == "reflection-importer:0.1.0"


def test_parallel_shards_wait_for_each_other_and_retry_only_the_failed_one():
    world = World(base_spec(parallelism=2))
    plan = world.step()
    assert sorted(c.request.name for c in plan.create) == [f"nightly-{RUN0}-1-0", f"nightly-{RUN0}-1-1"]
    world.end_pod(f"nightly-{RUN0}-1-0", 137, "OOMKilled")
    world.start_pod(f"nightly-{RUN0}-1-1")
    assert not world.step().create  # shard 1 still runs
    world.end_pod(f"nightly-{RUN0}-1-1", 0)
    plan = world.step()
    assert [c.request.name for c in plan.create] == [f"nightly-{RUN0}-2-0"]
    assert world.status["run"]["succeededShards"] == [1]
    world.end_pod(f"nightly-{RUN0}-2-0", 0)
    world.step()
    assert world.status["phase"] == "Succeeded"


def test_progress_sums_the_shards_of_the_current_run_only():
    world = World(base_spec(parallelism=2))
    world.step()
    world.summary = {
        0: ShardSummary(files_total=5, files_done=5, chunks=10, run=RunNumbers(files_read=5, chunks=10, seconds=3)),
        1: ShardSummary(
            files_total=4,
            files_done=1,
            chunks=3,
            files_failed=1,
            run=RunNumbers(files_unchanged=1, files_failed=1, skipped={"too_long": 1}, seconds=4),
        ),
        # Left over from parallelism 3:
        2: ShardSummary(files_total=100, files_done=100, chunks=1000, run=RunNumbers(files_read=100, chunks=1000)),
    }
    world.step()
    assert world.status["progress"] == "7/9" and world.status["chunks"] == 13
    assert world.status["filesFailed"] == 1 and world.status["percent"] == 77
    numbers = world.status["runNumbers"]
    assert (numbers["filesRead"], numbers["filesUnchanged"], numbers["filesFailed"], numbers["chunks"]) == (5, 1, 1, 10)
    assert numbers["skippedLines"] == [{"reason": "too_long", "lines": 1}]
    assert numbers["seconds"] == 4  # the slowest shard


def test_run_events_carry_this_runs_numbers_not_the_totals():
    """A run that finds nothing new says it wrote 0 chunks, even when earlier runs wrote many."""
    world = World()
    world.step()
    job = f"nightly-{RUN0}-1-0"
    world.start_pod(job)
    nothing_new = RunNumbers(files_unchanged=4, seconds=1)
    world.summary = {0: ShardSummary(files_total=4, files_done=4, chunks=28, phase="Succeeded", run=nothing_new)}
    world.end_pod(job, 0)
    plan = world.step()
    assert reasons(plan) == ["RunSucceeded"]
    assert "0 files read, 4 unchanged, 0 failed, 0 messages, 0 chunks written" in plan.events[0].message
    assert world.status["runNumbers"]["chunks"] == 0 and world.status["chunks"] == 28


# -- schedules -----------------------------------------------------------------------------------------


def scheduled_world(**overrides) -> World:
    world = World(base_spec(schedule="*/10 * * * * *", **overrides))
    world.created = T0 - timedelta(seconds=5)  # 09:59:55; runs at 10:00:00, 10:00:10, ...
    return world


def test_a_schedule_waits_for_its_time_then_starts_a_run():
    world = scheduled_world()
    world.now = T0 - timedelta(seconds=2)
    plan = world.step()
    assert not plan.create and world.status["phase"] == "Waiting"
    assert world.status["nextScheduleTime"] == iso(T0)
    assert plan.requeue_after == 2

    world.now = T0 + timedelta(milliseconds=30)
    plan = world.step()
    run_id = str(int(T0.timestamp()))
    assert [c.request.name for c in plan.create] == [job_name("nightly", run_id, 1, 0)]
    assert world.status["lastScheduleTime"] == iso(T0)
    assert world.status["nextScheduleTime"] == iso(T0 + timedelta(seconds=10))

    world.end_pod(job_name("nightly", run_id, 1, 0), 0)
    world.advance(1)
    world.step()
    assert world.status["phase"] == "Waiting"  # a scheduled ImportRun waits for its next run


def test_forbid_skips_a_run_while_one_is_active():
    world = scheduled_world(concurrencyPolicy="Forbid")
    world.now = T0
    world.step()
    world.start_pod(job_name("nightly", str(int(T0.timestamp())), 1, 0))
    world.now = T0 + timedelta(seconds=10)
    plan = world.step()
    assert not plan.create and not plan.delete
    assert reasons(plan) == ["RunSkipped"] and plan.counters == ["skipped"]
    assert world.status["lastScheduleTime"] == iso(T0)
    assert world.status["lastHandledScheduleTime"] == iso(T0 + timedelta(seconds=10))
    assert not world.step().events  # skipped once, not again


def test_replace_deletes_the_active_run_and_starts_when_its_pods_are_gone():
    world = scheduled_world(concurrencyPolicy="Replace")
    world.now = T0
    world.step()
    old_job = job_name("nightly", str(int(T0.timestamp())), 1, 0)
    world.start_pod(old_job)
    world.now = T0 + timedelta(seconds=10)
    plan = world.step(apply=False)
    assert plan.delete == [old_job]
    assert not plan.create  # the old Pod may still write the state
    assert "RunReplaced" in reasons(plan)
    world.step()  # carries it out: the Job and its Pod go
    plan = world.step()
    new_id = str(int((T0 + timedelta(seconds=10)).timestamp()))
    assert [c.request.name for c in plan.create] == [job_name("nightly", new_id, 1, 0)]
    assert plan.reset_summary


def test_a_run_too_late_for_its_starting_deadline_is_skipped_and_missed_runs_are_reported():
    world = scheduled_world(startingDeadlineSeconds=5)
    world.now = T0 + timedelta(seconds=38)  # 10:00:00, :10, :20 missed; :30 is 8 s late
    plan = world.step()
    assert not plan.create
    assert reasons(plan) == ["MissedRuns", "MissedSchedule"]
    assert "3 scheduled run(s)" in plan.events[0].message
    assert world.status["lastHandledScheduleTime"] == iso(T0 + timedelta(seconds=30))
    world.now = T0 + timedelta(seconds=40)
    assert world.step().create  # the next one is on time


def test_suspend_starts_nothing_and_resuming_catches_up_within_the_deadline():
    world = scheduled_world(suspend=True, startingDeadlineSeconds=60)
    world.now = T0 + timedelta(seconds=15)
    plan = world.step()
    assert not plan.create
    assert world.status["phase"] == "Suspended" and world.status["nextScheduleTime"] is None
    world.raw_spec = base_spec(schedule="*/10 * * * * *", suspend=False, startingDeadlineSeconds=60)
    world.now = T0 + timedelta(seconds=17)
    plan = world.step()
    assert [c.request.run_id for c in plan.create] == [str(int((T0 + timedelta(seconds=10)).timestamp()))]


def test_suspend_leaves_a_running_run_alone():
    world = World()
    world.step()
    world.start_pod(f"nightly-{RUN0}-1-0")
    world.raw_spec = base_spec(suspend=True)
    plan = world.step()
    assert not plan.delete and world.status["phase"] == "Running"


def test_history_limits_delete_the_oldest_finished_runs():
    world = scheduled_world(successfulRunsHistoryLimit=2, failedRunsHistoryLimit=1, failureRetry={"maxRetries": 0})
    for index in range(4):
        world.now = T0 + timedelta(seconds=10 * index)
        world.step()
        run_id = str(int(world.now.timestamp()))
        world.end_pod(job_name("nightly", run_id, 1, 0), 0 if index != 1 else 1)
        world.step()
    ids = [str(int((T0 + timedelta(seconds=10 * i)).timestamp())) for i in range(4)]
    # Kept: the two newest successful runs (2, 3) and the one failed run (1); run 0 is gone.
    assert sorted(world.jobs) == sorted(job_name("nightly", ids[i], 1, 0) for i in (1, 2, 3))
    world.now = T0 + timedelta(seconds=40)
    world.step()
    world.end_pod(job_name("nightly", str(int(world.now.timestamp())), 1, 0), 0)
    world.step()
    assert job_name("nightly", ids[2], 1, 0) not in world.jobs
    assert job_name("nightly", ids[1], 1, 0) in world.jobs


# -- bad input -----------------------------------------------------------------------------------------


def test_an_invalid_spec_creates_nothing_and_says_which_field_until_fixed():
    world = World(base_spec(schedule="not a cron"))
    plan = world.step()
    assert not plan.create
    ready = condition(world.status, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSchedule"
    assert "spec.schedule" in ready["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "InvalidSchedule")]
    assert world.status["phase"] == "Pending"
    assert not world.step().events  # the same problem is reported once

    world.raw_spec = base_spec(schedule="*/10 * * * * *")
    world.generation = 2
    world.now = T0 + timedelta(seconds=1)
    plan = world.step()
    assert condition(world.status, "Ready")["status"] == "True"
    assert "SpecValid" in reasons(plan)
    assert world.status["observedGeneration"] == 2


def test_missing_claims_block_new_runs():
    world = World()
    field = "spec.source.volume.persistentVolumeClaim.claimName"
    world.extra_problems = [Problem(field, "MissingVolumeClaim", "PersistentVolumeClaim 'q' does not exist")]
    plan = world.step()
    assert not plan.create
    assert condition(world.status, "Ready")["reason"] == "MissingVolumeClaim"
