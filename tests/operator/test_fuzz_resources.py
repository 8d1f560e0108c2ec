"""Mutated ProLongPipeline resources: wrong types, unknown fields, fromStage cycles, huge specs
(within what an API server stores: 200 KB strings, 300 stages, 2,000 streams, 400-deep
nesting), missing or duplicated stages, and edits in the middle of a run.

Every case must end with the spec refused in one line naming the field (the handler's
``resolve``; in status: SpecValid False, Stalled True, the reason in the condition's message) or
accepted whole; the handlers never raise anything else and never write a RayJob for a refused
spec. Two layers:

- the handler's validation (``handlers.resolve``, what reconcile calls first) on every case,
  directly: fast, so make test runs a sample and make bench (marker chaos) 1,000;
- end to end over HTTP against kmock: the CR stored in the API server, ``handlers.reconcile``
  run on it (as kopf's handlers call it), the status and RayJobs read back; for a run in
  progress, the spec edited to a mutant after stage 1's RayJob exists. make test runs a few,
  make bench 200.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from prolong.spec import SpecError
from prolong.stage.names import PIPELINE_LABEL
from tests.operator.conftest import Cluster, load_handlers, pipeline_cr

pytestmark = pytest.mark.timeout(900)

SAMPLE = 25  # make test, validation layer
END_TO_END_SAMPLE = 2  # make test, over kmock
FULL = 1000
FULL_END_TO_END = 200


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value under ``node`` (dict keys and list indices)."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _set(node: Any, path: tuple, value: Any) -> None:
    _get(node, path[:-1])[path[-1]] = value


OTHER_VALUES = ["x", "", 0, -1, 1.5, 10**30, True, None, [], [1, "a"], {}, {"a": 1},
                "1e400", "NaN", "../../etc", "a" * 300, "\u0000", "ümlaut-名前"]


def mutate_cr(cr: dict, rng: random.Random) -> str:
    """Mutate ``cr`` in place (one to three mutations); returns what was done."""
    done = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        done.append(_one(cr, rng))
    return "+".join(done)


def _one(cr: dict, rng: random.Random) -> str:
    spec = cr["spec"]
    stages = spec.get("stages") if isinstance(spec, dict) else None
    kind = rng.choice(("wrong-type", "wrong-type", "wrong-type", "unknown-field", "cycle",
                       "missing-stage", "huge", "duplicate-stage", "drop-field",
                       "bad-metadata"))
    if kind in ("cycle", "missing-stage", "duplicate-stage") and \
            not (isinstance(stages, list) and stages and all(isinstance(s, dict)
                                                              for s in stages)):
        kind = "wrong-type"
    paths = [p for p in _paths(spec) if p]
    if kind == "wrong-type" and paths:
        path = rng.choice(paths)
        _set(spec, path, copy.deepcopy(rng.choice(OTHER_VALUES)))
        return f"wrong-type:{'.'.join(map(str, path))[:60]}"
    if kind == "unknown-field":
        dicts = [p for p in _paths(spec) if isinstance(_get(spec, p), dict)]
        target = _get(spec, rng.choice(dicts))
        target[rng.choice(["extra", "unknownField", "Steps", "step", "kind", "x-y"])] = 1
        return "unknown-field"
    if kind == "cycle":
        i = rng.randrange(len(stages))
        j = rng.randrange(i, len(stages))  # itself or a later stage
        target = stages[j].get("name", "x")
        stage_spec = stages[i].setdefault("spec", {})
        if isinstance(stage_spec, dict):
            model = stage_spec.setdefault("model", {})
            if isinstance(model, dict):
                model["fromStage"] = target
        return "cycle"
    if kind == "missing-stage":
        choice = rng.choice(("delete-one", "empty", "absent"))
        if choice == "delete-one":
            del stages[rng.randrange(len(stages))]
        elif choice == "empty":
            spec["stages"] = []
        else:
            del spec["stages"]
        return f"missing-stage:{choice}"
    if kind == "huge":
        choice = rng.choice(("long-string", "many-stages", "many-streams", "deep"))
        if choice == "long-string":
            _set(spec, rng.choice(paths), "x" * rng.choice((10_000, 200_000)))
        elif choice == "many-stages" and isinstance(stages, list) and stages:
            spec["stages"] = [copy.deepcopy(stages[0]) for _ in range(rng.choice((50, 300)))]
        elif choice == "many-streams":
            dicts = [p for p in _paths(spec) if isinstance(_get(spec, p), dict)]
            _get(spec, rng.choice(dicts))["streams"] = [{"domain": "d", "path": "p",
                                                        "format": "jsonl"}] * 2000
        else:
            deep: Any = 1
            for _ in range(rng.choice((100, 400))):
                deep = {"a": deep}
            _set(spec, rng.choice(paths), deep)
        return f"huge:{choice}"
    if kind == "duplicate-stage":
        stages.append(copy.deepcopy(rng.choice(stages)))
        return "duplicate-stage"
    if kind == "drop-field" and paths:
        path = rng.choice(paths)
        parent = _get(spec, path[:-1])
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            del parent[path[-1]]
        return "drop-field"
    cr["metadata"]["name"] = rng.choice(["UPPER", "a" * 300, "-x", "x_y", ""])
    return "bad-metadata"


@dataclass
class Verdict:
    accepted: bool
    message: str
    lost: list[str]


def validate(handlers: Any, cr: dict) -> Verdict:
    """The handler's validation of one CR, as reconcile runs it (the body as the API server
    returns it: JSON)."""
    body = json.loads(json.dumps(cr))
    try:
        handlers.resolve(body)
    except SpecError as err:
        line = err.one_line()
        lost = []
        if "\n" in line or not line.strip():
            lost.append(f"not one line: {line[:200]!r}")
        if len(line) > 2000:
            lost.append(f"a {len(line)}-character message")
        return Verdict(False, line, lost)
    except RecursionError:
        return Verdict(False, "", ["RecursionError"])
    except Exception as exc:  # anything but SpecError is a crash of the handler
        return Verdict(False, "", [f"{type(exc).__name__}: {str(exc)[:200]}"])
    return Verdict(True, "", [])


MUST_REFUSE = ("unknown-field", "cycle", "missing-stage:empty", "missing-stage:absent",
               "duplicate-stage", "huge:many-stages", "bad-metadata")
"""Mutations no valid spec survives (the oracle: an unknown field is a typo, a stage starting
from itself or a later stage is a cycle, stage names are unique, a pipeline has stages, names
are DNS labels). A handler that accepts one swallowed an error."""


def must_refuse(kind: str) -> bool:
    return any(part.startswith(MUST_REFUSE) for part in kind.split("+"))


def fuzz_validation(seeds: range, handlers: Any = None,
                    ) -> tuple[list[tuple[str, Verdict]], Counter]:
    handlers = handlers or load_handlers()
    base = pipeline_cr()
    results = []
    for seed in seeds:
        rng = random.Random(seed)
        cr = copy.deepcopy(base)
        kind = mutate_cr(cr, rng)
        verdict = validate(handlers, cr)
        if verdict.accepted and must_refuse(kind):
            verdict.lost.append("accepted a spec that must be refused")
        results.append((kind, verdict))
    lost = [(k, v) for k, v in results if v.lost]
    assert not lost, "\n".join(f"{k}: {'; '.join(v.lost)}" for k, v in lost[:20])
    return results, Counter(part.split(":")[0] for k, _ in results for part in k.split("+"))


def test_mutated_resources_are_refused_in_one_line_by_the_handler():
    results, _ = fuzz_validation(range(SAMPLE))
    assert sum(not v.accepted for _, v in results) >= SAMPLE * 0.7


def test_a_handler_that_swallows_a_validation_error_is_caught(monkeypatch):
    # The planted bug: a lenient resolve that drops a fromStage naming no earlier stage (the
    # cycle error swallowed, the stage silently trained from scratch). The fuzz run must fail.
    handlers = load_handlers()
    real = handlers.resolve

    def lenient(body):
        seen = set()
        for stage in body["spec"].get("stages") or []:
            model = (stage.get("spec") or {}).get("model") if isinstance(stage, dict) else None
            if isinstance(model, dict) and model.get("fromStage") not in seen:
                model.pop("fromStage", None)
            if isinstance(stage, dict):
                seen.add(stage.get("name"))
        return real(body)

    monkeypatch.setattr(handlers, "resolve", lenient)
    with pytest.raises(AssertionError, match=r"cycle.*accepted a spec that must be refused"):
        fuzz_validation(range(SAMPLE), handlers)


# ---- end to end over kmock ------------------------------------------------------------------

def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386, what ``kubectl patch --type merge`` sends) that turns
    ``old`` into ``new``: a key the edit removed is sent as null, or the server keeps it."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    patch = {k: merge_patch(old.get(k), v) for k, v in new.items()}
    patch.update({k: None for k in old if k not in new})
    return patch


async def _stored(write) -> bool:
    """Whether the API server stored the write; False where it refused the body as too large
    (HTTP 413: such a resource never reaches the operator, as on a real API server, which caps
    requests at 3 MiB and objects at etcd's 1.5 MiB)."""
    try:
        await write
    except AssertionError as exc:
        if ": 413 " in str(exc):
            return False
        raise
    return True


def _rayjobs_of(cluster: Cluster, pipeline: str) -> set[str]:
    return {n for n, rj in cluster.rayjobs().items()
            if rj["metadata"]["labels"].get(PIPELINE_LABEL) == pipeline}


def _condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


async def _one_end_to_end(cluster: Cluster, handlers: Any, api: Any, seed: int,
                          mid_run: bool) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    cr = pipeline_cr(uid=f"uid-f{seed}")
    name = cr["metadata"]["name"] = f"f{seed}"
    mutant = copy.deepcopy(cr)
    kind = mutate_cr(mutant, rng)
    mutant["metadata"]["name"] = name  # a name the API server accepts; the spec is the mutant
    lost: list[str] = []
    if mid_run:  # a valid run under way, then its spec edited to the mutant
        await cluster.create_pipeline(cr)
        await asyncio.to_thread(handlers.reconcile, api, "default", name)  # its preparation
        await cluster.wait("stage 1 prepared", lambda: any(
            j.get("status") for j in cluster.jobs().values()
            if j["metadata"]["labels"].get(PIPELINE_LABEL) == name))
        await asyncio.to_thread(handlers.reconcile, api, "default", name)  # its RayJob
        before = _rayjobs_of(cluster, name)
        if len(before) != 1:
            lost.append(f"the valid pipeline created {sorted(before)}")
        kind = f"mid-run:{kind}"
        patch = merge_patch(cr["spec"], mutant["spec"])
        if not await _stored(cluster.edit_pipeline(name, patch, generation=2)):
            return f"{kind}+too-large", lost
    else:
        before = set()
        if not await _stored(cluster.create_pipeline(copy.deepcopy(mutant))):
            return f"{kind}+too-large", lost
    # Judged on what the API server stored (a null in a merge patch deletes the key); the
    # oracle applies where that is the mutant. The name was set back to one the API server
    # takes: a bad-metadata mutation is undone.
    stored = cluster.pipeline(name)
    accepted = validate(handlers, stored).accepted
    if accepted and stored["spec"] == mutant["spec"] and \
            must_refuse("+".join(p for p in kind.split("+") if p != "bad-metadata")):
        lost.append("accepted a spec that must be refused")
    try:
        await asyncio.to_thread(handlers.reconcile, api, "default", name)
    except Exception as exc:  # a crash of the handler (kopf would retry it forever)
        lost.append(f"reconcile raised {type(exc).__name__}: {str(exc)[:200]}")
        return kind, lost
    status = cluster.status(name)
    mine = _rayjobs_of(cluster, name)
    if not accepted:
        valid, stalled = _condition(status, "SpecValid"), _condition(status, "Stalled")
        if valid.get("status") != "False" or valid.get("reason") != "InvalidSpec":
            lost.append(f"SpecValid is {valid}")
        if stalled.get("status") != "True":
            lost.append(f"Stalled is {stalled}")
        message = valid.get("message") or ""
        if not message or "\n" in message:
            lost.append(f"reason not one line: {message[:200]!r} (SpecValid {valid})")
        if mine - before:
            lost.append(f"RayJobs written for an invalid spec: {sorted(mine - before)}")
    elif _condition(status, "SpecValid").get("status") != "True":
        lost.append(f"an accepted spec reads {_condition(status, 'SpecValid')}")
    return kind, lost


async def fuzz_end_to_end(cluster: Cluster, seeds: range) -> Counter:
    handlers = load_handlers()
    api = handlers.kube_client()
    kinds: Counter = Counter()
    failures = []
    for seed in seeds:
        kind, lost = await _one_end_to_end(cluster, handlers, api, seed, mid_run=seed % 3 == 0)
        kinds.update(part.split(":")[0] for part in kind.split("+"))
        if lost:
            failures.append(f"{seed} {kind}: {'; '.join(lost)}")
    assert not failures, "\n".join(failures[:20])
    return kinds


@pytest.mark.asyncio
async def test_mutated_resources_over_kmock(cluster: Cluster) -> None:
    await fuzz_end_to_end(cluster, range(END_TO_END_SAMPLE))


@pytest.mark.chaos
def test_a_thousand_mutated_resources():
    results, kinds = fuzz_validation(range(10_000, 10_000 + FULL))
    refused = sum(not v.accepted for _, v in results)
    print(f"\nProLongPipeline (handler validation): {len(results)} tried, {len(results)} "
          f"answered in one line ({refused} refused, {len(results) - refused} accepted whole), "
          f"0 lost; {dict(kinds)}")


@pytest.mark.chaos
@pytest.mark.asyncio
async def test_many_mutated_resources_over_kmock(cluster: Cluster) -> None:
    kinds = await fuzz_end_to_end(cluster, range(20_000, 20_000 + FULL_END_TO_END))
    print(f"\nProLongPipeline over kmock: {FULL_END_TO_END} tried ({kinds['mid-run']} edited "
          f"mid-run, {kinds['too-large']} refused by the API server as too large), all "
          f"answered, 0 lost; mutations {dict(kinds)}")
