"""Fine-tuning jobs are checked at the API: ``model`` names a registered base model, never a path
(``../probe-outside`` has a ``config.json`` and is still refused); bad hyperparameters are 400s,
not 500s; an importable scorer only when the operator allows it. A real gateway process on real
Redis (jobs are queued on a queue of their own that no worker reads)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from shared.data import write_jsonl
from tests.gateway.conftest import Records, fake_replica, gateway
from trainer.data_sources import build_splits

MODEL = "SmolLM2-135M-Instruct"
ALLOWED = "shared.scoring:exact_match"


@pytest.fixture(scope="module")
def ft(tmp_path_factory: pytest.TempPathFactory, redis_url: str,
       default_model_dir: Path) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ft")
    data_dir = root / "data"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / MODEL).symlink_to(default_model_dir, target_is_directory=True)
    for outside in (data_dir / "probe-outside", root / "probe-outside"):
        outside.mkdir()
        (outside / "config.json").write_text("{}")
    records = Records(data_dir)
    env = {"TUNEGATE_TRAINER_QUEUE_NAME": f"tunegate:test:{secrets.token_hex(4)}",
           "TUNEGATE_GATEWAY_ALLOWED_SCORERS": ALLOWED}
    with fake_replica("r1") as (engine, _), gateway(data_dir, [engine], redis_url,
                                                    env=env) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=records.key("admin"),
                               max_retries=0)
        train, _ = build_splits(n_train=40, n_golden=2, seed=0)
        with write_jsonl(root / "train.jsonl", train).open("rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        yield {"client": client, "file": file_id}


def create(ft: dict[str, Any], **kw: Any) -> Any:
    args: dict[str, Any] = {"model": MODEL, "training_file": ft["file"]}
    extra = kw.pop("extra_body", None)
    return ft["client"].fine_tuning.jobs.create(**{**args, **kw}, extra_body=extra)


@pytest.mark.parametrize("model", ["../probe-outside", "../../probe-outside", "probe-outside",
                                   f"{MODEL}/../../probe-outside", "/etc", ".", "..", ""])
def test_model_must_be_a_registered_base(ft: dict[str, Any], model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        create(ft, model=model)
    assert err.value.body["param"] == "model"  # type: ignore[index]


@pytest.mark.parametrize("hp", [
    {"n_epochs": 0}, {"n_epochs": -3}, {"n_epochs": 10_000},
    {"learning_rate_multiplier": -1}, {"learning_rate_multiplier": 0},
    {"learning_rate_multiplier": 1e12}, {"batch_size": 0}, {"batch_size": -8},
])
def test_bad_hyperparameters_are_400(ft: dict[str, Any], hp: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError):
        create(ft, hyperparameters=hp)


@pytest.mark.parametrize("extra", [
    {"lora_target_modules": ["not_a_module"]}, {"lora_alpha": 0}, {"max_steps": 0},
])
def test_bad_tunegate_fields_are_4xx(ft: dict[str, Any], extra: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError):
        create(ft, extra_body=extra)


@pytest.mark.parametrize("scorer", ["os:system", "subprocess:getoutput",
                                    "shared.scoring:normalize"])
def test_importable_scorers_only_from_the_allowlist(ft: dict[str, Any], scorer: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        create(ft, extra_body={"scorer": scorer})
    assert err.value.body["param"] == "scorer"  # type: ignore[index]


@pytest.mark.parametrize("scorer", [None, "exact", "label_set:fresh,rotten", ALLOWED])
def test_good_jobs_are_queued(ft: dict[str, Any], scorer: str | None) -> None:
    job = create(ft, hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5},
                 extra_body={"scorer": scorer} if scorer else None)
    assert job.status == "queued" and job.model == MODEL
