"""The one serve config: base + every overlay parses with Ray's schema and our typed args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from domains import DOMAINS
from services import config as serve_config
from services.config import GATEWAY, ServeOverlay, build_config, environments, model_configs, validate_config


@pytest.mark.parametrize("environment", environments())
def test_base_and_every_overlay_parse(environment: str) -> None:
    config = build_config(environment)
    args = validate_config(config)
    assert set(args.domains) == set(DOMAINS)
    names = {d["name"] for d in config["applications"][0]["deployments"]}
    assert names == {GATEWAY, *DOMAINS}
    for name, user_config in model_configs(config).items():
        assert user_config.stage == "production", name  # the stage, never a version number
        dep = next(d for d in config["applications"][0]["deployments"] if d["name"] == name)
        # at or below the batch size a replica never holds a full batch: batches never fill
        assert dep["max_ongoing_requests"] > user_config.max_batch_size


def test_overlays_change_only_what_they_name() -> None:
    local, cluster = build_config("local"), build_config("cluster")
    assert local["http_options"]["host"] == "127.0.0.1"
    deps = {d["name"]: d for d in cluster["applications"][0]["deployments"]}
    assert deps["events"]["ray_actor_options"]["num_gpus"] == 0.25
    assert deps["events"]["user_config"]["stage"] == "production"  # merged, not replaced
    assert cluster["applications"][0]["args"]["registry_uri"].startswith("s3://")


def test_the_cluster_serves_no_api_docs() -> None:
    """/docs and /openapi.json list every route and limit to whoever asks: public on this machine only."""
    assert validate_config(build_config("local")).api_docs == "public"
    assert validate_config(build_config("cluster")).api_docs == "off"


def test_run_values_and_domain_subsets() -> None:
    run = ServeOverlay(http_options={"port": 8123}, deployments={"energy": {"user_config": {"generation": 4}}})
    config = build_config("local", run, domains=["energy"])
    (app,) = config["applications"]
    assert config["http_options"]["port"] == 8123 and list(app["args"]["domains"]) == ["energy"]
    assert [d["name"] for d in app["deployments"]] == [GATEWAY, "energy"]
    assert model_configs(config)["energy"].generation == 4


@pytest.mark.parametrize("overlay, match", [
    ({"deployment": {}}, "deployment"),  # a typo of `deployments`
    ({"deployments": {"water": {}}}, "water"),
    ({"args": {"domains": {"events": {"max_itemz": 3}}}}, "max_itemz"),
    ({"deployments": {"events": {"user_config": {"stage": "production", "generaton": 1}}}}, "generaton"),
    ({"deployments": {"events": {"num_replicas": -1}}}, "num_replicas"),
])
def test_bad_overlays_are_refused(overlay: dict[str, object], match: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("base", "local"):
        (tmp_path / f"{name}.yaml").write_text((serve_config.SERVE_DIR / f"{name}.yaml").read_text())
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(overlay))
    monkeypatch.setattr(serve_config, "SERVE_DIR", tmp_path)
    with pytest.raises(ConfigError, match=match):
        build_config("broken")
    with pytest.raises(ConfigError, match="no serve overlay"):
        build_config("nowhere")
