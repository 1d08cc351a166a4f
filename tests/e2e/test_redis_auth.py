"""A Redis that demands a login works for every part: server, Celery broker, workers, the reaper."""

from __future__ import annotations

import pytest
import redis


TEXT = "the time traveller smiled round at us " * 60


@pytest.mark.parametrize("user", ["", "gradserve"], ids=["password", "acl-user"])
def test_a_job_runs_end_to_end_through_a_password_protected_redis(make_stack, user):
    s = make_stack(f"redis-auth-{user or 'default'}")
    s.redis_user, s.redis_password = user, "s3cret-pass"
    s.start_redis()
    assert "s3cret-pass@" in s.redis_url
    with pytest.raises(redis.RedisError):  # the login is really required
        redis.Redis(port=s.redis_port, socket_timeout=2).set("probe", 1)
    s.start_server()
    s.start_worker("w")
    with s.client() as c:
        job = c.submit(dataset=c.upload_bytes(TEXT), model="gru", hidden_size=8, batch_size=4, num_steps=10,
                       max_steps=20, log_every=10)
        assert job.wait(timeout=120).state == "SUCCEEDED"
        assert [e.metrics.step for e in job.events() if e.WhichOneof("kind") == "metrics"] == [10, 20]
