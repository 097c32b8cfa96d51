"""The text models' optimised artifacts: export, fusion and int8 on a smoke-trained events model,
the backend each device gets, the accuracy gate at promotion, and `cityserve models optimize`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cityserve import cli
from core.errors import ConfigError, RegistryError
from core.settings import Settings, get_settings
from domains import get_domain
from domains.calibration import CALIBRATION_FILE
from domains.onnx_text import AGREEMENT, ARTIFACTS, GATE, choose_backend, gate_failures, quantize
from domains.text import EXPLAIN_WORDS, TextDomain, TextPredictor, teacher_key
from tests.schemas import validate
from tests.unit.conftest import SmokeRun
from training.registry import Registry, stored_artifacts
from training.workspace import Workspace

DOMAIN = "events"


@pytest.fixture(scope="module")
def domain(run: SmokeRun) -> TextDomain:
    assert isinstance(run.domain, TextDomain)
    return run.domain


@pytest.fixture(scope="module")
def optimized(run: SmokeRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A copy of the smoke model with its artifacts, and what `optimize` measured."""
    assert run.history  # trained
    model_dir = tmp_path_factory.mktemp("optimized") / "model"
    shutil.copytree(run.model_dir, model_dir)
    inference = run.domain.optimize(model_dir, run.data_dir)
    assert inference is not None
    return model_dir, inference


def test_each_stored_backend_is_calibrated_on_the_validation_split(run: SmokeRun, domain: TextDomain,
                                                                    optimized: tuple[Path, dict[str, Any]]) -> None:
    model_dir, inference = optimized
    fitted = domain.calibrate(model_dir, run.data_dir)
    kept = {n for n in ("onnx-int8", "student-int8") if inference["backends"][n]["kept"]}
    assert set(fitted) == {"torch-fp32", "onnx-fp32"} | kept
    assert json.loads((model_dir / CALIBRATION_FILE).read_text()) == fitted
    for name, calibration in fitted.items():
        assert calibration["temperature"] > 0 and 0.3 <= calibration["uncertain_below"] <= 0.95, name
        backend = "torch" if name == "torch-fp32" else name
        assert domain.load_predictor(model_dir, "v1", backend=backend).calibration.as_json() == calibration


def test_the_export_is_fused_and_labels_as_pytorch_does(optimized: tuple[Path, dict[str, Any]]) -> None:
    model_dir, inference = optimized
    backends = inference["backends"]
    assert inference["metric"] == "macro_f1" and inference["texts"] == 80  # the smoke test split
    fp32 = backends["onnx-fp32"]
    # One fused attention per layer, two skip layer norms per layer, the embeddings' layer norm.
    assert fp32["fusions"]["Attention"] == 6 and fp32["fusions"]["SkipLayerNormalization"] == 12
    assert fp32["fusions"]["EmbedLayerNormalization"] == 1
    assert fp32["agreement"] >= AGREEMENT and abs(fp32["delta"]) < 1e-9
    assert (model_dir / ARTIFACTS["onnx-fp32"]).is_file()
    for name in ("onnx-int8", "student-int8"):
        int8 = backends[name]
        assert int8["kept"] == (int8["delta"] >= -GATE) == (model_dir / ARTIFACTS[name]).is_file()
    student = backends["student-int8"]  # three layers: three fused attentions, an export that agrees
    assert student["layers"] == [0, 2, 4] and student["fusions"]["Attention"] == 3
    assert student["export_agreement"] >= AGREEMENT


def test_a_student_starts_from_every_other_layer_of_its_teacher() -> None:
    assert teacher_key("encoder.encoder.layer.1.attention.self.query.weight") == \
        "encoder.encoder.layer.2.attention.self.query.weight"
    assert teacher_key("encoder.encoder.layer.2.output.dense.bias") == "encoder.encoder.layer.4.output.dense.bias"
    assert teacher_key("encoder.embeddings.word_embeddings.weight") == "encoder.embeddings.word_embeddings.weight"
    assert teacher_key("heads.label.weight") == "heads.label.weight"


def test_int8_quantises_the_encoder_and_keeps_the_heads_in_fp32(optimized: tuple[Path, dict[str, Any]],
                                                                tmp_path: Path) -> None:
    model_dir, _ = optimized
    quantize(model_dir / ARTIFACTS["onnx-fp32"], tmp_path / "int8.onnx")
    nodes = onnx.load(str(tmp_path / "int8.onnx")).graph.node
    ops = {node.op_type for node in nodes}
    assert "QAttention" in ops and ({"DynamicQuantizeMatMul", "MatMulInteger"} & ops)
    heads = [node for node in nodes if node.name.startswith(("/model/label/", "/model/priority/"))]
    assert sorted(node.op_type for node in heads) == ["Add", "Add", "MatMul", "MatMul"]  # fp32, no MatMulInteger


def test_onnx_answers_as_pytorch_does_whatever_the_padding(run: SmokeRun, domain: TextDomain,
                                                           optimized: tuple[Path, dict[str, Any]]) -> None:
    model_dir, _ = optimized
    texts = domain.splits(run.data_dir)["test"]["text"].tolist()[:24]
    by_torch = domain.load_predictor(model_dir, "v", backend="torch")
    by_onnx = domain.load_predictor(model_dir, "v", backend="onnx-fp32")
    assert by_onnx.backend == "onnx-fp32"
    want, got = by_torch.run(texts), by_onnx.run(texts)
    one_by_one = [by_onnx.run([text]) for text in texts]  # each padded to itself, not to the batch's longest
    for output in ("label", "priority"):
        assert np.abs(got[output] - want[output]).max() < 1e-4, output
        alone = np.concatenate([o[output] for o in one_by_one])
        assert np.abs(alone - got[output]).max() < 1e-4, output
    answers = by_onnx.predict([run.domain.request_model.model_validate({"text": text}) for text in texts])
    assert [a.model_dump()["label"] for a in answers] == [a.model_dump()["label"] for a in by_torch.predict(
        [run.domain.request_model.model_validate({"text": text}) for text in texts])]


@pytest.mark.parametrize(("wanted", "device", "stored", "chosen"), [
    ("auto", "cpu", ["student-int8", "onnx-int8", "onnx-fp32"], "student-int8"),
    ("auto", "cpu", ["onnx-int8", "onnx-fp32"], "onnx-int8"),
    ("auto", "cpu", ["onnx-fp32"], "onnx-fp32"),
    ("auto", "cpu", [], "torch"),
    ("auto", "cuda", ["onnx-int8", "onnx-fp32"], "torch"),  # bf16 PyTorch on a GPU
    ("torch", "cpu", ["onnx-int8"], "torch"),
    ("onnx-fp32", "cpu", ["onnx-int8", "onnx-fp32"], "onnx-fp32"),
])
def test_the_backend_follows_the_device_and_the_config(wanted: str, device: str, stored: list[str],
                                                       chosen: str) -> None:
    assert choose_backend(wanted, device, stored, "events v3") == chosen


@pytest.mark.parametrize(("wanted", "device", "stored", "message"), [
    ("onnx-int8", "cpu", ["onnx-fp32"], "events v3 has no onnx-int8 artifact; make it with `cityserve models "
                                        "optimize events v3`"),
    ("onnx-int8", "cuda:1", ["onnx-int8"], "runs on the CPU, not on cuda:1"),
    ("tensorrt", "cpu", [], "unknown backend 'tensorrt'"),
])
def test_a_backend_that_cannot_serve_is_refused_by_name(wanted: str, device: str, stored: list[str],
                                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        choose_backend(wanted, device, stored, "events v3")
    assert caught.value.field == "backend"


def test_the_gate_allows_one_point_below_pytorch() -> None:
    inference: dict[str, Any] = {"metric": "macro_f1", "backends": {"torch-fp32": {"value": 0.80},
                                                                    "onnx-fp32": {"value": 0.80},
                                                                    "onnx-int8": {"value": 0.7901}}}
    assert gate_failures(inference, ["onnx-int8", "onnx-fp32"]) == []
    inference["backends"]["onnx-int8"]["value"] = 0.7850
    (failure,) = gate_failures(inference, ["onnx-int8", "onnx-fp32"])
    assert failure.startswith("onnx-int8 scores macro_f1 0.7850 on the test split, 1.5 points below")
    assert gate_failures({}, ["onnx-fp32"]) == ["onnx-fp32 has no recorded test metric"]


def with_both_artifacts(optimized: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    """A model folder with both artifacts, whatever the gate decided about the smoke model's int8."""
    model_dir = tmp_path / "both"
    shutil.copytree(optimized[0], model_dir)
    (model_dir / ARTIFACTS["student-int8"]).unlink(missing_ok=True)
    if not (model_dir / ARTIFACTS["onnx-int8"]).is_file():
        quantize(model_dir / ARTIFACTS["onnx-fp32"], model_dir / ARTIFACTS["onnx-int8"])
    return model_dir


def test_promotion_refuses_an_artifact_below_the_gate(run: SmokeRun, optimized: tuple[Path, dict[str, Any]],
                                                      tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "registry"))
    model_dir = with_both_artifacts(optimized, tmp_path)
    inference = json.loads(json.dumps(optimized[1]))
    reference = inference["backends"]["torch-fp32"]["value"]
    inference["backends"]["onnx-int8"]["value"] = reference - 0.02
    bad = registry.register(DOMAIN, model_dir, {"inference": inference})
    with pytest.raises(RegistryError, match=r"onnx-int8 scores macro_f1 .* 2\.0 points below .*is unchanged"):
        registry.promote(DOMAIN, bad.version)
    assert registry.stages(DOMAIN)["production"] is None
    inference["backends"]["onnx-int8"]["value"] = reference
    good = registry.register(DOMAIN, model_dir, {"inference": inference})
    assert stored_artifacts(good) == ["onnx-int8", "onnx-fp32"]
    registry.promote(DOMAIN, good.version, verify=lambda path: run.domain.load_predictor(path, good.version))
    assert registry.load_predictor(run.domain).backend == "onnx-int8"
    assert registry.load_predictor(run.domain, backend="torch").backend == "torch-fp32"


def test_only_a_recorded_artifact_serves_and_models_optimize_records_them(
        run: SmokeRun, optimized: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(str(tmp_path / "registry"))
    plain = registry.register(DOMAIN, run.model_dir, {"config": {"data_dir": str(run.data_dir)}})
    # A file put into the folder behind the registry's back has no checksum: it never loads.
    shutil.copy(optimized[0] / ARTIFACTS["onnx-fp32"], tmp_path / "registry" / DOMAIN / plain.version)
    assert registry.load_predictor(run.domain, plain.version).backend == "torch-fp32"
    with pytest.raises(ConfigError, match="has no onnx-fp32 artifact"):
        registry.load_predictor(run.domain, plain.version, backend="onnx-fp32")

    monkeypatch.setenv("CITYSERVE_REGISTRY_URI", str(tmp_path / "registry"))
    monkeypatch.setenv("CITYSERVE_DATA_DIR", str(tmp_path / "elsewhere"))  # scored on the data it was trained on
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(cli.main, ["models", "optimize", DOMAIN, plain.version, "--json"])
    finally:
        get_settings.cache_clear()
    assert out.exit_code == 0, out.output
    rows = {row["backend"]: row for row in json.loads(out.output)}
    assert set(rows) == {"torch-fp32", "onnx-fp32", "onnx-int8", "student-int8"} and rows["onnx-fp32"]["kept"] == "yes"
    remade = registry.get(DOMAIN, plain.version)
    assert remade.record["inference"]["texts"] == 80 and "onnx-fp32" in stored_artifacts(remade)
    served = registry.load_predictor(run.domain, plain.version, backend="onnx-fp32")
    assert isinstance(served, TextPredictor) and served.backend == "onnx-fp32"
    recorded = remade.record["calibration"]["onnx-fp32"]
    assert served.calibration.as_json() == recorded and CALIBRATION_FILE in remade.record["files"]
    answer = served.predict([run.domain.request_model(text="street light out on 5th ave")])[0]
    assert answer.uncertain == (answer.confidence < recorded["uncertain_below"])  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="traffic serves with backend auto or torch, not 'onnx-int8'"):
        registry.load_predictor(get_domain("traffic"), backend="onnx-int8")


def test_the_inference_bench_times_every_backend_in_its_schemas_shape(
        run: SmokeRun, domain: TextDomain, optimized: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from bench import inference

    # Registered with the artifacts `optimize` made (making them again would be `models optimize`'s
    # test, beside this one): the bench measures what the version stores.
    registry = Registry(str(tmp_path / "registry"))
    model_dir, measured = optimized
    version = registry.register(DOMAIN, model_dir, {"config": {"data_dir": str(run.data_dir)}, "inference": measured})
    registry.promote(DOMAIN, version.version)
    rows = inference.measure(domain, Workspace(Settings(), registry), repeats=1, threads=1,
                             items={1: 4, 8: 16, 64: 64})
    validate("inference", {"commit": "0" * 40, "device": inference.device_name(), "rows": rows})
    by_backend = {(row["backend"], row["batch_size"]): row for row in rows}
    for batch in inference.BATCHES:
        assert by_backend[("torch-fp32", batch)]["ratio_to_torch_fp32"] == 1.0
        fp32 = by_backend[("onnx-fp32", batch)]
        assert fp32["metric_delta_to_torch_fp32"] == 0.0 and fp32["label_agreement_with_torch_fp32"] == 1.0
        assert ("torch-int8", batch) in by_backend
    assert all(row["items_per_s"] > 0 and row["test_texts"] == 80 for row in rows)


def test_the_shipped_inference_results_fit_their_schema() -> None:
    document = json.loads((Path(__file__).resolve().parents[2] / "bench/results/inference.json").read_text())
    validate("inference", document)
    assert len(document["commit"]) == 40


@pytest.mark.parametrize("backend", ["torch", "onnx-int8"])
def test_an_explanation_weighs_the_words_of_the_text_on_the_served_model(
        domain: TextDomain, optimized: tuple[Path, dict[str, Any]], backend: str) -> None:
    model_dir, _ = optimized
    if backend != "torch" and not (model_dir / ARTIFACTS[backend]).is_file():
        pytest.skip(f"the smoke model's {backend} fell below the gate")
    predictor = domain.load_predictor(model_dir, "v1", backend=backend)
    text = "Water main break on Fulton St, water gushing into the street"
    items = [domain.request_model(text=text), domain.request_model(text="loud party next door")]
    plain, explained = predictor.predict(items), predictor.explain(items)
    for answer, with_why, sent in zip(plain, explained, items, strict=True):
        why = with_why.explanation  # type: ignore[attr-defined]
        assert with_why.model_dump(exclude={"explanation"}) == answer.model_dump(exclude={"explanation"})
        words = sent.text.split()  # type: ignore[attr-defined]
        assert 0 < len(why.words) <= EXPLAIN_WORDS and all(w.word in sent.text for w in why.words)  # type: ignore[attr-defined]
        assert [abs(w.weight) for w in why.words] == sorted((abs(w.weight) for w in why.words), reverse=True)
        assert why.forward_passes >= len(words) + 2  # "St," is two words to the tokenizer
    # a word's weight is the fall in the answer's log-odds when its tokens are hidden from attention
    assert isinstance(predictor, TextPredictor)
    enc = predictor.tokenizer(text, return_tensors="pt")
    top = explained[0].explanation.words[0]  # type: ignore[attr-defined]
    word = next(w for w in set(enc.word_ids()) - {None} if text[slice(*enc.word_to_chars(w))] == top.word)
    hidden = enc["attention_mask"].clone()
    hidden[0, [i for i, w in enumerate(enc.word_ids()) if w == word]] = 0
    full, without = (predictor.log_odds(mask, enc["input_ids"])[0] for mask in (enc["attention_mask"], hidden))
    chosen = int(full.argmax())
    assert float(full[chosen] - without[chosen]) == pytest.approx(top.weight, abs=1e-4)
