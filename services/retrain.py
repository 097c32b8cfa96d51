"""`cityserve retrain DOMAIN`: the learning loop's last step, from what tenants told us back to a
candidate answering a share of live traffic — never further.

1. **Cases.** Each feedback (its latest, per tenant, request id and item) joins the sampled item it
   is about (`services.samples`): the item as stored, masked. Feedback about an item that was not
   sampled has nothing to learn from and is counted, not used. Cases with the same item are one
   case (the truth about its latest request), so a report sent again is learnt and judged once.
2. **Hold-out.** A case is held out when the hash of its tenant and request id falls in the
   `holdout` share: stable from run to run (a case held out once never trains a later model) and
   whole per request (its items are never split between training and judging).
3. **Data.** The production version's data, with the training cases added to its training split
   (`Domain.feedback_rows`; a forecaster's feedback only judges). Valid and test stay as they were,
   so both versions are judged on the same test split.
4. **Training**, as `cityserve train` with production's profile, registering a candidate.
5. **The gate** (`judge`): on the domain's quality metric (`Domain.score`, as `cityserve monitor`
   shows live), the candidate must beat production on the feedback hold-out by more than `min_gain`
   and lose at most `max_test_loss` (relative) on the test split. It passes: the candidate starts a
   canary (`models canary`) for people to promote or abort. It fails: the candidate stays a
   candidate, and the figures say why. Either way the record keeps them (`retrain`).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError, RegistryError
from domains.base import Domain
from domains.tables import load_table, read_manifest, with_rows
from services.monitor import latest_feedback
from services.samples import Root, read
from training.registry import Version
from training.workspace import Workspace

# Where a retrain's data goes, under the data root it started from.
RETRAIN_DIR = "_retrain"


@dataclass(frozen=True)
class RetrainOptions:
    """How `retrain` splits, judges and canaries (the CLI's options)."""

    holdout: float = 0.2  # the share of requests whose feedback only judges
    min_holdout: int = 20  # fewer held-out cases than this: refused before training (the gate would mean nothing)
    min_gain: float = 0.0  # on the hold-out, the candidate must beat production by more than this
    max_test_loss: float = 0.01  # on the test split, it may lose at most this share of production's figure
    weight: float = 10.0  # the canary's percent of requests
    shadow: bool = False  # a shadow canary: answers a copy, never returned

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout {self.holdout:g}: give a share between 0 and 1", field="holdout")
        if self.min_holdout < 1:
            raise ConfigError(f"min_holdout {self.min_holdout}: at least 1", field="min_holdout")
        if self.max_test_loss < 0:
            raise ConfigError(f"max_test_loss {self.max_test_loss:g}: not negative", field="max_test_loss")


@dataclass(frozen=True)
class Case:
    tenant: str
    request_id: str
    item: dict[str, Any]
    truth: dict[str, Any]


@dataclass
class Cases:
    """Feedback joined to its samples, split into training and hold-out."""

    train: list[Case]
    holdout: list[Case]
    feedback: int  # feedback items read (latest per tenant, request id and item)
    unsampled: int  # of them, about items the sample log does not hold
    duplicates: int  # of them, about an item another case already holds


def held_out(tenant: str, request_id: str, share: float) -> bool:
    """Whether a request's feedback is in the hold-out: a hash, so the same every run."""
    digest = hashlib.sha256(f"{tenant}\0{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def feedback_cases(root: Root, domain: str, holdout: float) -> Cases:
    """`domain`'s feedback joined to the sampled items it is about, deduplicated and split."""
    truths = latest_feedback(read(root, "feedback", domain))
    sampled: dict[tuple[str, str, int], tuple[Any, dict[str, Any]]] = {}  # (when it was asked, the item)
    for row in read(root, "samples", domain).to_pylist():  # a shadow's row holds the same item as production's
        sampled.setdefault((row["tenant"], row["request_id"], row["item"]), (row["at"], json.loads(row["request"])))
    joined = sorted(((*sampled[key], key, truth) for key, truth in truths.items() if key in sampled),
                    key=lambda found: (found[0], found[2]))
    unique: dict[str, Case] = {}
    for _, item, (tenant, request_id, _), truth in joined:  # of one item asked twice, the later request wins
        unique[json.dumps(item, sort_keys=True, ensure_ascii=False)] = Case(tenant, request_id, item, truth)
    cases = Cases([], [], len(truths), len(truths) - len(joined), len(joined) - len(unique))
    for case in unique.values():
        (cases.holdout if held_out(case.tenant, case.request_id, holdout) else cases.train).append(case)
    return cases


@dataclass
class Gate:
    """The candidate against production on the feedback hold-out and the test split."""

    metric: str
    mode: str
    production: dict[str, dict[str, float]]  # "holdout" and "test": every figure of `Domain.score`
    candidate: dict[str, dict[str, float]]
    holdout_items: int
    test_items: int
    min_gain: float
    max_test_loss: float
    passed: bool = False
    reasons: list[str] = field(default_factory=list)


def judge(gate: Gate) -> Gate:
    """Sets `passed` and says why, from the figures of the quality metric."""
    sign = 1.0 if gate.mode == "max" else -1.0
    try:
        held_prod, held_cand, test_prod, test_cand = (versions[part][gate.metric] for part in ("holdout", "test")
                                                      for versions in (gate.production, gate.candidate))
    except KeyError:  # a forecast's truths without one known value
        gate.reasons.append(f"nothing to score {gate.metric} on")
        return gate
    gain = sign * (held_cand - held_prod)
    if gain <= gate.min_gain:
        gate.reasons.append(f"feedback hold-out {gate.metric}: candidate {held_cand:.4g} against production "
                            f"{held_prod:.4g}, not better by more than {gate.min_gain:g}")
    loss = sign * (test_prod - test_cand)
    if loss > gate.max_test_loss * abs(test_prod):
        gate.reasons.append(f"test split {gate.metric}: candidate {test_cand:.4g} against production {test_prod:.4g}, "
                            f"worse by more than {gate.max_test_loss:.0%}")
    gate.passed = not gate.reasons
    return gate


@dataclass
class Retrained:
    domain: str
    production: str
    candidate: str
    gate: Gate
    data: dict[str, Any]  # what it trained on: the data folder, rows added, cases held out, dropped
    canary: bool  # the candidate now answers a share of traffic

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def retrain(domain: Domain, ws: Workspace, options: RetrainOptions, **train_options: Any) -> Retrained:
    """The whole step (module docstring); `train_options` as `training.trainer.make_trainer`'s
    (workers, GPUs, epochs), the profile being production's."""
    from training.trainer import train

    registry = ws.registry
    production = registry.get(domain.name, "production")
    running = registry.canary(domain.name)
    if running:  # refused now, not after an hour of training
        raise RegistryError(f"a canary of {domain.name} {running['version']} runs: promote it or abort it before "
                            "retraining", field="domain")
    cases = feedback_cases(ws.settings.registry_location(), domain.name, options.holdout)
    if len(cases.holdout) < options.min_holdout:
        raise ConfigError(f"{domain.name}: {len(cases.holdout)} feedback cases held out of {cases.feedback} feedback "
                          f"items ({cases.unsampled} about items not sampled); the gate needs {options.min_holdout}: "
                          "collect more feedback (from tenants that sample) or lower --min-holdout",
                          field="min_holdout")
    data_dir, data = training_data(domain, ws.data_dir_of(production), cases)
    candidate = train(domain, ws, profile=production.record.get("profile", "quick"), data_dir=data_dir,
                      **train_options)
    gate = compare(domain, ws, production, candidate, cases.holdout, options)
    registry.add_files(domain.name, candidate.version, {}, {"retrain": {
        "production": production.version, "data": data, "gate": asdict(gate)}})
    if gate.passed:
        registry.start_canary(domain.name, candidate.version, options.weight, shadow=options.shadow,
                              verify=lambda path: domain.load_predictor(path, candidate.version))
    return Retrained(domain.name, production.version, candidate.version, gate, data, gate.passed)


def training_data(domain: Domain, production_data: Path, cases: Cases) -> tuple[Path, dict[str, Any]]:
    """The data folder to train on and what went into it: the data production started from (not a
    retrain's, whose feedback this run reads again), in a copy with the training cases added where
    the domain learns from feedback."""
    base = production_data
    manifest = read_manifest(base, domain.name)
    if "feedback" in manifest:
        base = Path(manifest["feedback"]["base"])
    summary = {"feedback": cases.feedback, "unsampled": cases.unsampled, "duplicates": cases.duplicates,
               "holdout": len(cases.holdout), "train": len(cases.train)}
    rows = domain.feedback_rows(load_table(base, domain.name, "train"), [c.item for c in cases.train],
                                [c.truth for c in cases.train]) if cases.train else None
    if rows is None:
        return base, {**summary, "data_dir": str(base), "added": 0}
    out = base / RETRAIN_DIR / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    with_rows(base, out, domain.name, rows, source=f"feedback:{len(rows)} cases",
              extra={"feedback": {"base": str(base), **summary}})
    return out, {**summary, "data_dir": str(out), "added": len(rows)}


def compare(domain: Domain, ws: Workspace, production: Version, candidate: Version, holdout: list[Case],
            options: RetrainOptions) -> Gate:
    """Both versions' `Domain.score` on the hold-out and on the candidate's test split, judged."""
    registry = ws.registry
    with registry.model_dir(domain.name, candidate.version) as path:
        test_items, test_truths = domain.cases(path, ws.data_dir_of(candidate), "test")
    figures = {}
    for version in (production, candidate):
        predictor = registry.load_predictor(domain, version.version)
        figures[version.version] = {
            "holdout": domain.score(domain.answers(predictor, [c.item for c in holdout]), [c.truth for c in holdout]),
            "test": domain.score(domain.answers(predictor, test_items), test_truths)}
    return judge(Gate(domain.quality_metric, domain.quality_mode, figures[production.version],
                      figures[candidate.version], len(holdout), len(test_items), options.min_gain,
                      options.max_test_loss))
