"""Where an attempt starts (worker.runtime.plan_attempt): a first attempt runs the job's
request as it is; a continued one gets a request of its own and leaves the job's alone."""

from __future__ import annotations

from common.jobs import ChoiceDelta, ChunkEvent, JobRequest, OutputSpec, SamplingSpec
from worker.runtime import plan_attempt


def request() -> JobRequest:
    return JobRequest(prompt_token_ids=[1, 2, 3], sampling=SamplingSpec(max_tokens=10, min_tokens=4))


def delta(seq: int, ids: list[int], text: str, finish: str | None = None) -> ChunkEvent:
    return ChunkEvent(
        seq=seq, kind="delta", choices=[ChoiceDelta(index=0, text=text, token_ids=ids, finish_reason=finish)]
    )


def test_a_first_attempt_runs_the_request_as_it_is() -> None:
    job = request()
    plan = plan_attempt(job, [])
    assert plan.request is job and plan.next_seq == 0
    assert plan.texts == {} and plan.tokens == {} and plan.finished == {}


def test_a_continued_attempt_gets_a_request_of_its_own() -> None:
    job = request()
    before = job.model_dump()
    plan = plan_attempt(job, [delta(0, [7, 8], "ab"), delta(1, [9], "c")])
    assert plan.request.prompt_token_ids == [1, 2, 3, 7, 8, 9]
    assert plan.request.sampling.max_tokens == 7 and plan.request.sampling.min_tokens == 1
    assert plan.texts == {0: "abc"} and plan.tokens == {0: 3} and plan.next_seq == 2
    # The job's own request (the record's, read again by any later attempt) is unchanged.
    assert job.model_dump() == before


def test_a_finished_choice_and_min_tokens_spent() -> None:
    job = request()
    plan = plan_attempt(job, [delta(0, [5, 6, 7, 8, 9], "xyz", finish="stop")])
    assert plan.finished == {0: "stop"} and plan.request.sampling.min_tokens == 0
    assert job.sampling.min_tokens == 4 and job.prompt_token_ids == [1, 2, 3]


def test_a_job_that_cannot_continue_starts_over() -> None:
    job = request().model_copy(update={"output": OutputSpec()})
    plan = plan_attempt(job, [delta(0, [7], "a")])
    assert plan.request is job and plan.next_seq == 1 and plan.tokens == {}


def test_a_task_outcome_is_short_key_value_text() -> None:
    from worker.runtime import outcome

    done = {
        "status": "completed",
        "attempt": 1,
        "finish_reasons": ["length"],
        "usage": {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31, "prompt_tokens_details": None},
    }
    assert outcome(done) == "status=completed attempt=1 finish=length prompt_tokens=30 completion_tokens=1"
    assert outcome({"status": "cancelled", "started": False}) == "status=cancelled started=false"
    assert outcome({"status": "failed", "error": "engine died"}) == 'status=failed error="engine died"'
    assert outcome({"jobs": 3, "status": {"completed": 2, "error": 1}}) == "jobs=3 completed=2 error=1"
