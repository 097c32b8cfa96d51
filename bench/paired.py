"""Two versions of a text model on the same hand-written set: each one's macro-F1 and the paired
bootstrap interval of their difference, to tell a lever's effect from the noise of a small set.

    .venv/bin/python -m bench.paired events REGISTRY:VERSION REGISTRY:VERSION [--backend torch]

Each side is a registry (a path or URI) and a version id or alias of the domain in it; the two may
sit in different registries (one per experiment). Both answer every text of the domain's
hand-written set (`TextDomain.hand_written`) with the same backend; the bootstrap resamples the
texts (with replacement, the same resample for both sides) and recomputes the difference each
time. Prints the figures; writes no file.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from domains import DOMAINS, get_domain
from domains.metrics import macro_f1
from domains.text import TextDomain
from training.registry import Registry

RESAMPLES = 2000
SEED = 0


def answers(domain: TextDomain, side: str, texts: Sequence[str], backend: str) -> np.ndarray:
    """Class indices `side` ("REGISTRY:VERSION") predicts for `texts`."""
    registry, _, ref = side.rpartition(":")
    if not registry or not ref:
        raise SystemExit(f"{side!r}: expected REGISTRY:VERSION")
    predictor = Registry(registry).load_predictor(domain, ref, backend=backend)
    return np.asarray(predictor.outputs(list(texts))[0]).argmax(axis=1)  # type: ignore[attr-defined]


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, classes: Sequence[object],
                     resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, float]:
    """Macro-F1 of predictions `a` and `b` of truths `y`, their difference (b - a) and its 95%
    interval over `resamples` paired resamples."""
    draws = np.random.default_rng(seed).integers(0, len(y), (resamples, len(y)))
    diffs = [macro_f1(y[i], b[i], classes) - macro_f1(y[i], a[i], classes) for i in draws]
    first, second = macro_f1(y, a, classes), macro_f1(y, b, classes)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"a": first, "b": second, "difference": second - first, "low": float(low), "high": float(high)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domain", choices=sorted(DOMAINS))
    parser.add_argument("a", metavar="REGISTRY:VERSION")
    parser.add_argument("b", metavar="REGISTRY:VERSION")
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args(argv)
    domain = get_domain(args.domain)
    if not isinstance(domain, TextDomain):
        parser.error(f"{args.domain} has no hand-written set: only the text domains have one")
    hand = domain.written_by_hand(domain.hand_written)
    y = np.array([domain.labels.index(label) for label in hand["label"]])
    a, b = (answers(domain, side, hand["text"].tolist(), args.backend) for side in (args.a, args.b))
    result = paired_bootstrap(y, a, b, range(len(domain.labels)))
    print(f"{domain.hand_written} ({len(y)} texts), macro-F1, backend {args.backend}")
    print(f"  a  {args.a}: {result['a']:.3f}")
    print(f"  b  {args.b}: {result['b']:.3f}")
    print(f"  b - a {result['difference']:+.3f}, 95% interval {result['low']:+.3f} to {result['high']:+.3f} "
          f"({RESAMPLES} paired resamples)")


if __name__ == "__main__":
    main()
