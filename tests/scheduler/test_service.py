from pice.scheduler.policy import PolicyConfig, QueryFeatures
from pice.scheduler.service import CloudMeter, Scheduler
from pice.scheduler.state import EdgeState

EDGES = (EdgeState("e0", (), 8, 0, 16.0),)


def test_cloud_meter_counts_queue_and_rate() -> None:
    m = CloudMeter(slots=2)
    m.start("interactive")
    m.start("batch")
    s = m.state()
    assert (s.queue_depth, s.batch_depth, s.slots) == (2, 1, 2)
    m.finish("batch", 50, 10.0)
    m.finish("interactive", 0, 0.0)  # nothing measured: the rate stands
    assert m.state().queue_depth == 0 and m.tokens_per_s == 5.0
    m.observe_rate(100, 10.0)
    assert 5.0 < m.tokens_per_s < 10.0


def test_busy_cloud_shortens_sketches_through_the_meter() -> None:
    sched = Scheduler.build("dynamic", PolicyConfig(), cloud_slots=2)
    q = QueryFeatures("How can I sleep better?", suitability=0.95)
    idle = sched.decide(q, EDGES)
    for _ in range(3):
        sched.cloud.start("interactive")
    busy = sched.decide(q, EDGES)
    assert busy.words_per_point < idle.words_per_point and "cloud busy" in busy.reason


def test_full_cloud_answers_teach_the_length_model() -> None:
    sched = Scheduler.build("dynamic", PolicyConfig())
    q = QueryFeatures("Write a haiku about rain.", suitability=0.05)
    d = sched.decide(q, EDGES)
    assert d.mode == "cloud" and d.predicted_tokens == 220
    for _ in range(30):
        sched.observe_answer(q, d, 40)
    assert sched.decide(q, EDGES).predicted_tokens < 80
