"""Trust between tenants: a flood of made-up keys does not reach a tenant's latency, and a tenant's
refused requests are counted against its own quota.

Both drive the running gateway over real HTTP; the flood runs in a process of its own at the lowest
CPU priority (`serving.flood`), as another machine would, so the tenant's latency measures the
platform and not the load generator.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.reliability import Check, Target
from bench.reliability.serving import flood, load, ms, verdict

TENANT_SLOWDOWN = 1.5  # the tenant's median latency during the flood, at most this times its quiet one


def check_unauthenticated_flood(target: Target, short: bool = False) -> Check:
    """One client sends made-up keys (a new one each request) as fast as it can, 8 at a time,
    while a tenant sends 5 requests a second: none of the tenant's is refused, and its median
    latency stays within 1.5x of its median alone just before. The admission actor's CPU per
    flood request says what the flood cost the one component every tenant shares."""
    domain, seconds = "energy", (15 if short else 60)
    _, key = target.tenant("steady", [domain])
    probe = {"concurrency": 8, "rate": 5.0}
    quiet = load(target, domain, key, until=time.monotonic() + (8 if short else 20), **probe)
    cpu_before = _admission_cpu_s(target)
    end = time.monotonic() + seconds
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        flooding = pool.submit(flood, target, domain, None, concurrency=8, until=end)
        during = load(target, domain, key, until=end, **probe)
        sent, flood_cpu_s = flooding.result(timeout=seconds + 60)
    admission_cpu_s = _admission_cpu_s(target) - cpu_before
    statuses = sorted({s.status for s in sent})
    figures: dict[str, Any] = {
        "flood_seconds": seconds, "flood_requests": len(sent), "flood_per_s": round(len(sent) / seconds, 1),
        "flood_statuses": {str(code): sum(s.status == code for s in sent) for code in statuses},
        "flood_client_cpu_s": round(flood_cpu_s, 1),
        "tenant_requests": len(quiet) + len(during), "tenant_refused": sum(s.status != 200 for s in quiet + during),
        "tenant_quiet_p50_ms": ms(quiet, 50), "tenant_flood_p50_ms": ms(during, 50),
        "tenant_quiet_p99_ms": ms(quiet, 99), "tenant_flood_p99_ms": ms(during, 99),
        "admission_cpu_s": round(admission_cpu_s, 3),
        "admission_cpu_ms_per_flood_request": round(1000 * admission_cpu_s / max(1, len(sent)), 4),
    }
    problems = []
    if figures["tenant_refused"]:
        problems.append(f"{figures['tenant_refused']} of the tenant's requests were not answered 200")
    if set(statuses) - {401, 429}:
        problems.append(f"made-up keys got statuses {statuses}: only 401 and 429 are right")
    timing = []
    if ms(during, 50) > TENANT_SLOWDOWN * ms(quiet, 50):
        timing.append(f"the tenant's median latency rose from {ms(quiet, 50)} to {ms(during, 50)} ms "
                      f"(over {TENANT_SLOWDOWN}x)")
    return verdict("unauthenticated_flood", figures, problems, timing, short)


def check_refusals_metered(target: Target, short: bool = False) -> Check:
    """A tenant with a quota of Q requests a minute sends invalid bodies (and calls a domain it is
    not granted) as fast as it can: within the minute at most Q are answered with their 4xx, the
    rest get 429 like any over-quota request — and a valid request after them is refused too."""
    quota = 30 if short else 120
    _, key = target.tenant("sloppy", ["energy"], requests_per_minute=quota)
    invalid = load(target, "energy", key, concurrency=4, until=time.monotonic() + (5 if short else 15),
                   items=0)  # an empty list: 422 for a tenant whose key is good
    forbidden = load(target, "events", key, concurrency=2, until=time.monotonic() + 2)
    asked = iter([False])  # one request, then done
    valid = load(target, "energy", key, concurrency=1, until=lambda: next(asked, True))
    answered_4xx = sum(s.status in (403, 422) for s in invalid + forbidden)
    figures = {"quota_per_minute": quota, "invalid_sent": len(invalid), "not_granted_sent": len(forbidden),
               "answered_403_or_422": answered_4xx,
               "refused_429": sum(s.status == 429 for s in invalid + forbidden),
               "other_statuses": sorted({s.status for s in invalid + forbidden} - {403, 422, 429}),
               "valid_after_status": valid[0].status if valid else None}
    problems = []
    if answered_4xx > quota:
        problems.append(f"{answered_4xx} refusals answered within a minute; the quota is {quota}")
    if not figures["refused_429"]:
        problems.append("no refusal was throttled (429)")
    if figures["other_statuses"]:
        problems.append(f"statuses {figures['other_statuses']} besides 403, 422 and 429")
    if figures["valid_after_status"] != 429:
        problems.append(f"a valid request after the quota was spent on refusals got {figures['valid_after_status']}")
    return verdict("refusals_metered", figures, problems, [], short)


def _admission_cpu_s(target: Target) -> float:
    """CPU seconds the admission actor's process has used (its Ray process is named after the class)."""
    return sum(seconds for name, seconds in target.cpu_seconds().items() if "Admission" in name)
