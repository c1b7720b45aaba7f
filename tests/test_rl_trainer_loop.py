"""`megaflow.rl.trainer.train` closing the loop on real workers (RabbitMQ, PostgreSQL, Celery).

The scripted model samples (its turns record no prompt ids: SmolLM2's tokenizer fills
them in) and a tiny Llama with SmolLM2's vocabulary learns, so the test takes seconds
of training, not minutes. The run is `sync`: the second batch may only be sampled
once the trainer has published version 1 after the first.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from test_rl_trainer import tiny_llama

from megaflow.db.models import Episode, Step
from megaflow.export import HFChatTokenizer
from megaflow.rl.train_spec import TrainSpec
from megaflow.rl.trainer import Learner, train

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="rl-train-host")]


def run_spec(tmp_path) -> str:
    spec = {
        "name": "rl-train-loop",
        "rollouts": 2,
        "model": {"type": "scripted", "replies": ["```bash\ntouch a.txt\n```", "```bash\nsubmit\n```"]},
        "sandbox": {"type": "memory"},
        "limits": {"max_steps": 4},
        "rl": {"mode": "sync", "groups_per_batch": 1},
        "tasks": [{"instance_id": f"t{i}", "instruction": "make a.txt", "check": "true" if i else "false"}
                  for i in range(2)],
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_train_consumes_batches_and_publishes_a_version_per_step(cluster, tmp_path, smollm2_tokenizer):
    tokenizer = smollm2_tokenizer  # SmolLM2's fills in the scripted turns' prompt ids
    spec = TrainSpec.parse({"run": run_spec(tmp_path), "output_dir": str(tmp_path / "out"), "lr": 0.01,
                            "threads": 1, "batch_timeout_s": 120})
    learner = Learner(spec, model=tiny_llama(vocab=len(tokenizer)))

    logs = train(spec, cluster.client, learner=learner, tokenizer=HFChatTokenizer(tokenizer))

    assert [log.step for log in logs] == [1, 2]
    assert [log.policy_version for log in logs] == [1, 2]
    # sync: batch 1 was sampled before any version, batch 2 only by version 1.
    assert logs[0].sampled_versions == [0] and logs[1].sampled_versions == [1]
    assert all(log.episodes == 2 and log.train_s > 0 for log in logs)
    assert {log.mean_reward for log in logs} == {0.0, 1.0}  # task t0's check fails, t1's passes
    assert all(log.format_error_rate == 0.0 for log in logs)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["policy_version"] for line in lines] == [1, 2]
    assert (tmp_path / "out" / "step-00002.pt").is_file()
    run_id = (tmp_path / "out" / "run_id").read_text().strip()
    with cluster.client.session() as s:
        versions = s.execute(select(Step.policy_version).join(Episode, Episode.id == Step.episode_id)
                             .where(Episode.run_id == run_id)).scalars().all()
    assert set(versions) <= {None, 0, 1} and 1 in versions
    # Every batch was acknowledged: a new consumer gets nothing.
    with cluster.client.batches(run_id, groups_per_batch=1, tokenizer=HFChatTokenizer(tokenizer),
                                timeout_s=30) as stream:
        assert list(stream) == []
