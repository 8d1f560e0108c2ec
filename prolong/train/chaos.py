"""A chaos drill for a whole stage: ``PROLONG_CHAOS=seed:S,kills:K`` SIGKILLs a random training
worker at K moments of one run, from outside the workers.

Two halves, talking through files in ``<stage dir>/.chaos/`` (local stage directories only: the
killer signals process ids, so it runs on the machine that hosts the workers, as a local Ray
instance does):

- the workers (:func:`chaos_point`) announce the moments worth dying in: ``start`` (a worker came
  up, with its pid), ``step`` (this rank drew its rows of step N; its peers are inside the step's
  collectives), ``save`` (DeepSpeed's shards of checkpoint N written to the local temporary
  directory, the RNG state and trainer state not yet, nothing reported), ``saved`` (checkpoint N
  reported and persisted), ``load`` (a restarted worker chose checkpoint N and is about to load
  it) and ``final`` (rank 0 wrote the final weights locally and is about to publish ``final/``,
  or published it and is about to write the manifest and COMPLETE). Each announcement is one
  line appended to ``events.jsonl``; the worker then waits for the killer's acknowledgement, so
  a kill lands at that moment rather than somewhere after it;
- the killer (:class:`ChaosMonkey`, a thread of the driver that runs the stage) follows the file
  and, for each of its K planned kills in turn, lets a drawn number of matching moments pass and
  then sends SIGKILL to the planned rank's current process (it may be another rank than the one
  that announced the moment). Every kill is recorded in ``kills.jsonl``: when, which pid and
  rank, at which moment, and the newest checkpoint the run had by then.

Ray Train sees a dead worker, tears the group down and restarts it from the latest checkpoint,
up to ``cluster.maxFailures`` times: a plan with more kills than that is refused before the run.
The plan (from the seed alone) always holds a kill at each kind of moment: mid-step, mid-save,
while a restarted worker loads its checkpoint, twice in one checkpoint interval (a kill at the
first step after a restart, before the next checkpoint), and while ``final/`` is published.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHAOS_ENV = "PROLONG_CHAOS"
CHAOS_DIR = ".chaos"
EVENTS = "events.jsonl"
KILLS = "kills.jsonl"
ACKS = "acks"
POINTS = ("start", "step", "save", "saved", "load", "final")
KILL_AT = ("step", "save", "load", "final")
"""The moments a kill can be planned at (``start`` and ``saved`` are announced for the record)."""
ACK_TIMEOUT_S = 120.0
"""How long a worker waits for the killer before going on (a driver that died with its killer
must not hang the workers)."""


class ChaosSpecError(ValueError):
    """A PROLONG_CHAOS value that does not parse (one line, naming the variable)."""


@dataclass(frozen=True)
class ChaosSpec:
    seed: int
    kills: int

    @classmethod
    def parse(cls, text: str) -> ChaosSpec:
        """``seed:S,kills:K`` (either order)."""
        fields: dict[str, int] = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition(":")
            if not sep or key not in ("seed", "kills") or key in fields:
                raise ChaosSpecError(f"{CHAOS_ENV}={text!r}: expected seed:S,kills:K")
            try:
                fields[key] = int(value)
            except ValueError:
                raise ChaosSpecError(f"{CHAOS_ENV}={text!r}: {key} must be an integer") from None
        if set(fields) != {"seed", "kills"} or fields["kills"] < 0:
            raise ChaosSpecError(f"{CHAOS_ENV}={text!r}: expected seed:S,kills:K with K >= 0")
        return cls(seed=fields["seed"], kills=fields["kills"])

    @classmethod
    def from_env(cls) -> ChaosSpec | None:
        text = os.environ.get(CHAOS_ENV)
        return cls.parse(text) if text else None


@dataclass
class Kill:
    """One planned kill: let ``skip`` matching moments pass, then kill rank ``victim``."""

    point: str
    skip: int
    victim: int
    label: str = ""
    """Why it is in the plan (``twice-in-interval`` for the second of such a pair)."""


def plan_kills(spec: ChaosSpec, *, world: int, every_steps: int) -> list[Kill]:
    """The seeded plan: one kill at each kind of moment, a pair inside one checkpoint interval,
    the rest drawn among step, save and load; the ``final`` kills last (nothing follows final/).
    A ``load`` kill always follows another kill (only a restart loads). The first kill waits for
    the first checkpoint, so that every restart has one to load."""
    rng = random.Random(spec.seed)
    k = spec.kills
    if k == 0:
        return []

    def step_kill(skip: int, label: str = "") -> Kill:
        return Kill("step", skip, rng.randrange(world), label)

    # The first kill after the first checkpoint exists (steps every_steps+1 ...).
    plan = [step_kill(every_steps + rng.randrange(every_steps))]
    finals = 0 if k < 3 else 1 if k < 10 else 2
    budget = k - len(plan) - finals
    # What every drill of this size holds, in order of priority, then draws to fill the plan:
    # a kill mid-save, one while a restarted worker loads, and one at the first step after the
    # first kill's restart (two kills in one checkpoint interval).
    middle: list[list[Kill]] = []
    for group in ([Kill("save", rng.randrange(2), rng.randrange(world))],
                  [Kill("load", 0, rng.randrange(world))]):
        if sum(map(len, middle)) + len(group) <= budget:
            middle.append(group)
    if sum(map(len, middle)) < budget:
        plan.append(step_kill(0, "twice-in-interval"))
        budget -= 1
    while sum(map(len, middle)) < budget:
        point = rng.choice(("step", "step", "save", "load"))
        skip = {"step": rng.randrange(2 * every_steps), "save": rng.randrange(2),
                "load": 0}[point]
        middle.append([Kill(point, skip, rng.randrange(world))])
    rng.shuffle(middle)
    for group in middle:
        plan += group
    # skip 1: after final/ is published, before the manifest and COMPLETE
    plan += [Kill("final", rng.randrange(2), rng.randrange(world)) for _ in range(finals)]
    return plan


# ---- the workers' side ---------------------------------------------------------------------

_sequence = 0


def chaos_point(point: str, step: int, *, stage_dir: str, rank: int) -> None:
    """Announce ``point`` of step ``step`` to the killer and wait for it (a no-op without
    PROLONG_CHAOS). The killer either acknowledges or SIGKILLs a worker: maybe this one."""
    global _sequence
    if not os.environ.get(CHAOS_ENV) or "://" in stage_dir:
        return
    base = Path(stage_dir) / CHAOS_DIR
    _sequence += 1
    event_id = f"{os.getpid()}-{_sequence}"
    line = json.dumps({"id": event_id, "point": point, "step": step, "rank": rank,
                       "pid": os.getpid(), "time": time.time()}) + "\n"
    base.mkdir(parents=True, exist_ok=True)
    # One write of a short line in append mode: lines from several workers never interleave.
    fd = os.open(base / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    ack = base / ACKS / event_id
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while not ack.exists():
        if time.monotonic() > deadline:
            print(f"chaos: no answer to {point}:{step} in {ACK_TIMEOUT_S:.0f} s, going on",
                  flush=True)
            return
        time.sleep(0.005)


# ---- the killer ----------------------------------------------------------------------------

@dataclass
class KillRecord:
    kill: int
    time: float
    point: str
    step: int
    announced_by: int
    victim_rank: int
    victim_pid: int
    restart: int
    """Worker-group restarts before this kill (the number of earlier kills)."""
    checkpoint: int | None
    """The newest checkpoint persisted before the kill (None: none yet)."""
    saves_since_previous_kill: int
    label: str = ""
    died: bool = True


@dataclass
class ChaosMonkey:
    """The killer thread of one stage run. Use as a context manager around the run."""

    stage_dir: Path
    plan: list[Kill]
    poll_s: float = 0.02
    records: list[KillRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base = Path(self.stage_dir) / CHAOS_DIR
        self._stop = threading.Event()
        self._pids: dict[int, int] = {}
        self._retired: set[int] = set()
        self._skipped = 0
        self._checkpoint: int | None = None
        self._saves_since_kill = 0
        self._offset = 0
        self.error: BaseException | None = None

    def __enter__(self) -> ChaosMonkey:
        (self.base / ACKS).mkdir(parents=True, exist_ok=True)
        # A rerun of the same stage continues the files: only new events count.
        events = self.base / EVENTS
        self._offset = events.stat().st_size if events.exists() else 0
        self._thread = threading.Thread(target=self._follow, name="chaos-monkey", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def remaining(self) -> int:
        return len(self.plan) - len(self.records)

    def _follow(self) -> None:
        try:
            while not self._stop.is_set():
                for event in self._new_events():
                    self._handle(event)
                self._stop.wait(self.poll_s)
        except BaseException as exc:  # surfaced by the caller; the workers go on unkilled
            self.error = exc

    def _new_events(self) -> list[dict]:
        events = self.base / EVENTS
        if not events.exists():
            return []
        with open(events, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def _handle(self, event: dict) -> None:
        if event["pid"] in self._retired:
            # A worker of a group that already lost one (its peers run on until Ray Train stops
            # them): its moments are not the restarted run's.
            (self.base / ACKS / event["id"]).touch()
            return
        self._pids[event["rank"]] = event["pid"]
        if event["point"] == "saved":
            self._checkpoint = event["step"]
            self._saves_since_kill += 1
        elif event["point"] == "load":
            self._checkpoint = event["step"]
        match = self._matches(event) if self.remaining else None
        if match == "fallback" or (match == "planned"
                                   and self._skipped >= self.plan[len(self.records)].skip):
            self._kill(event)
            return
        if match == "planned":
            self._skipped += 1
        (self.base / ACKS / event["id"]).touch()

    def _matches(self, event: dict) -> str | None:
        """``planned``: the moment the next kill waits for; ``fallback``: a moment it must take
        instead, at once (none of its own will come); None: neither."""
        kill = self.plan[len(self.records)]
        # One announcement per moment: the victim's own where it announces this point (every
        # rank announces steps, saves and loads), else rank 0's (final/ is rank 0's alone).
        announcer = kill.victim if kill.point in ("step", "save", "load") else 0
        if event["point"] == kill.point:
            return "planned" if event["rank"] == announcer else None
        # A plan the run outlived still ends in kills: past the last step only final/ and the
        # loads before it are left, so what is still planned lands on final/; a load planned
        # for a restart that found no checkpoint lands on its first step.
        if event["point"] == "final" or (kill.point == "load" and event["point"] == "step"
                                         and event["rank"] == announcer):
            return "fallback"
        return None

    def _kill(self, event: dict) -> None:
        kill = self.plan[len(self.records)]
        victim, pid = kill.victim, self._pids.get(kill.victim)
        if pid is None or not _alive(pid):
            # Not up yet, or gone (a peer of an earlier kill that Ray had yet to stop, or a rank
            # with nothing left to do): the worker that announced the moment, paused in it.
            victim, pid = event["rank"], event["pid"]
        try:
            os.kill(pid, signal.SIGKILL)
            died = _wait_gone(pid)
        except ProcessLookupError:
            died = False
        self.records.append(KillRecord(
            kill=len(self.records) + 1, time=time.time(), point=event["point"],
            step=event["step"], announced_by=event["rank"], victim_rank=victim,
            victim_pid=pid, restart=len(self.records), checkpoint=self._checkpoint,
            saves_since_previous_kill=self._saves_since_kill, label=kill.label, died=died))
        with open(self.base / KILLS, "a") as f:
            f.write(json.dumps(asdict(self.records[-1])) + "\n")
        self._skipped = 0
        self._saves_since_kill = 0
        self._retired |= {pid, *self._pids.values()}
        self._pids.clear()  # the restarted group announces its new pids

    def summary(self) -> str:
        """One line: how many kills landed where."""
        by_point: dict[str, int] = {}
        for r in self.records:
            by_point[r.point] = by_point.get(r.point, 0) + 1
        where = ", ".join(f"{p} {by_point[p]}" for p in KILL_AT if p in by_point)
        return (f"chaos: {len(self.records)} of {len(self.plan)} planned worker kills "
                f"({where or 'none landed'}); log {self.base / KILLS}")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie that its parent, the raylet, has yet to
    reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` is gone or a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.01)
    return False


def read_kills(stage_dir: str | Path) -> list[dict]:
    """The kill log of a stage directory (empty when no drill ran there)."""
    path = Path(stage_dir) / CHAOS_DIR / KILLS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def chaos_drill(stage_dir: str, *, world: int, every_steps: int, max_failures: int,
                say: Callable[[str], None]) -> Iterator[ChaosMonkey | None]:
    """Around one training stage's run: the killer of PROLONG_CHAOS (None without it). Refuses
    (ChaosSpecError, one line) a plan Ray Train could not survive or a killer could not reach."""
    spec = ChaosSpec.from_env()
    if spec is None:
        yield None
        return
    if spec.kills > max_failures:
        raise ChaosSpecError(f"{CHAOS_ENV}: {spec.kills} kills exceed cluster.maxFailures "
                             f"{max_failures}; Ray Train would give up after {max_failures}")
    if "://" in stage_dir:
        raise ChaosSpecError(f"{CHAOS_ENV}: the killer signals local processes; {stage_dir} is "
                             "not a local stage directory")
    monkey = ChaosMonkey(Path(stage_dir), plan_kills(spec, world=world, every_steps=every_steps))
    say(f"chaos: {spec.kills} worker kills planned (seed {spec.seed})")
    with monkey:
        yield monkey
    say(monkey.summary())
    if monkey.error is not None:
        raise RuntimeError(f"chaos killer failed: {monkey.error!r}") from monkey.error
