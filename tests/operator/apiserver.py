"""kmock's Kubernetes emulator plus what the operator's fault handling meets in a real API server.

kmock (0.8) stores objects and streams watches; this subclass (kmock's documented way to add
behaviour: inherit and override) adds, over the same HTTP:

* resourceVersion: every write stamps a new one, and a merge patch that carries a stale one is
  answered 409 Conflict without being applied, as optimistic concurrency does;
* injected faults (:class:`Fault`) on the requests of the operator's own client (the
  ``kubernetes`` package: kopf's and the test's requests are left alone unless a fault says
  so): rejected before being applied (500, 503, 409, ...), applied and then answered 500 (the
  response lost), applied and answered only after a delay or never (until the test ends);
* watch disconnects: :meth:`ApiServer.cut_watches` ends every open watch stream, as an API
  server restart or its timeout does; kopf then watches again;
* observers of each stored write (:attr:`ApiServer.on_write`), for invariants that must hold at
  the moment a stage starts or a status is written;
* admission of the operator's RayJob creates as a cluster with KubeRay 1.6/1.7 (and Kueue, as
  :attr:`ApiServer.kueue` says) would judge them (tests.oracles.admission): a refusal is
  answered 422 with the reasons and kept in :attr:`ApiServer.refusals`, which the operator
  tests' fixture requires to be empty unless a test expects one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import attrs
import kmock

from tests.oracles.admission import rayjob_errors
from tests.oracles.kueue import Namespace

FaultKind = Literal["reject", "lose", "hang", "slow", "before"]

OPERATOR_CLIENT = "OpenAPI-Generator/"  # the kubernetes package's User-Agent (the handlers)
KOPF_CLIENT = "kopf/"


@dataclass
class Fault:
    """A fault for the next ``times`` requests that ``match`` (None: every one until removed).

    ``reject``: answered ``status`` and not applied. ``lose``: applied, answered ``status``.
    ``hang``: applied, answered when the test ends (the client times out first). ``slow``:
    applied, answered after ``delay`` s. ``before``: ``hook`` runs first (a concurrent writer:
    KubeRay, a user, another operator), then the request is served normally."""

    match: Callable[[kmock.Request], bool]
    kind: FaultKind
    status: int = 500
    times: int | None = 1
    delay: float = 0.0
    hook: Callable[[], Awaitable[None]] | None = None
    hits: int = 0
    message: str = "injected fault: rejected, not applied"
    """What a ``reject`` answers (a webhook's, a quota's words)."""



@contextlib.asynccontextmanager
async def in_background(work: Awaitable[Any]) -> AsyncIterator[None]:
    """``work`` (a test's stand-in controller or kubelet) runs while the block does, and is
    cancelled and awaited when it ends."""
    task = asyncio.ensure_future(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

def request_of(client: str, action: kmock.action, resource: kmock.resource,
               subresource: str | None = None) -> Callable[[kmock.Request], bool]:
    """A matcher: ``client``'s (User-Agent prefix) request of this action on this resource."""
    def match(request: kmock.Request) -> bool:
        return (request.headers.get("User-Agent", "").startswith(client)
                and request.action == action and request.resource == resource
                and request.subresource == subresource)
    return match


def named(match: Callable[[kmock.Request], bool],
          name: str) -> Callable[[kmock.Request], bool]:
    """``match``, narrowed to requests about the object ``name`` (in the URL or, for a create,
    in the body)."""
    def narrowed(request: kmock.Request) -> bool:
        body = request.data if isinstance(request.data, dict) else {}
        return match(request) and name in (request.name, (body.get("metadata") or {}).get("name"))
    return narrowed


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    faults: list[Fault] = attrs.field(factory=list, init=False)
    on_write: list[Callable[[kmock.Request], None]] = attrs.field(factory=list, init=False)
    """Called with each create or patch once it is stored (a refused one is not)."""
    kueue: Namespace = attrs.field(factory=Namespace, init=False)
    """How Kueue is set up in the namespace (the oracle of its webhook)."""
    refusals: list[str] = attrs.field(factory=list, init=False)
    """The oracles' verdicts on refused RayJob creates, in order."""
    _versions: Any = attrs.field(factory=lambda: itertools.count(100), init=False)
    _writes: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _released: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _watches: set[asyncio.Event] = attrs.field(factory=set, init=False)

    def inject(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def cut_watches(self) -> int:
        """End every open watch stream (cleanly, as a server-side timeout does); how many."""
        for stop in self._watches:
            stop.set()
        return len(self._watches)

    def forget_requests(self) -> None:
        """Drop the request history. kmock matches each request against every reaction by
        walking the whole history, so a test that sends thousands of requests (the fault
        property test) forgets between steps to stay fast."""
        self._requests.clear()

    def release(self) -> None:
        """Answer every hung request now (at the end of a test)."""
        self._released.set()

    async def __aexit__(self, *exc: Any) -> None:
        self.release()
        await super().__aexit__(*exc)

    def _take(self, request: kmock.Request) -> Fault | None:
        for fault in self.faults:
            if fault.match(request):
                fault.hits += 1
                if fault.times is not None and fault.hits >= fault.times:
                    self.faults.remove(fault)
                return fault
        return None

    async def _handle(self, request: kmock.Request) -> Any:
        fault = self._take(request)
        if fault is not None and fault.kind == "before":
            await fault.hook()
        elif fault is not None and fault.kind == "reject":
            raise kmock.KubernetesError(status=fault.status, reason=_reason(fault.status),
                                        message=fault.message)
        self._admit(request)
        writes = request.resource is not None and request.action in (
            kmock.action.CREATE, kmock.action.UPDATE)
        if writes:
            async with self._writes:  # the check and the write are one step, as in etcd
                self._stamp(request)
                response = await super()._handle(request)
            for observe in self.on_write:  # stored: a refusal raised above
                observe(request)
        else:
            response = await super()._handle(request)
        if fault is None or fault.kind == "before":
            return response
        if fault.kind == "lose":
            raise kmock.KubernetesError(status=fault.status, reason=_reason(fault.status),
                                        message="injected fault: applied, response lost")
        if fault.kind == "hang":
            await self._released.wait()
        elif fault.kind == "slow":
            await asyncio.sleep(fault.delay)
        return response

    def _admit(self, request: kmock.Request) -> None:
        """The operator's RayJob creates, judged by the oracles of every KubeRay we claim."""
        if not (request.action == kmock.action.CREATE and request.resource is not None
                and request.resource.group == "ray.io" and isinstance(request.data, dict)
                and request.headers.get("User-Agent", "").startswith(OPERATOR_CLIENT)):
            return
        errors = rayjob_errors(request.data, self.kueue)
        if errors:
            self.refusals.append("; ".join(errors))
            raise kmock.KubernetesError(status=422, reason="Invalid",
                                        message="; ".join(errors)[:2000])

    def _stamp(self, request: kmock.Request) -> None:
        """Optimistic concurrency: a patch with a resourceVersion other than the stored one is
        refused; every accepted write gets a new resourceVersion (before kmock stores it, so the
        response and the watch event carry it)."""
        data = request.data
        if not isinstance(data, dict):
            return
        meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else None
        if request.action == kmock.action.UPDATE:
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return  # kmock answers 404
            stored = (self.objects[key].get("metadata") or {}).get("resourceVersion")
            wanted = (meta or {}).get("resourceVersion")
            if wanted is not None and wanted != stored:
                raise kmock.KubernetesError(
                    status=409, reason="Conflict",
                    message="the object has been modified; please apply your changes to the "
                            "latest version and try again")
        data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        stop = asyncio.Event()
        self._watches.add(stop)
        inner = super()._serve_watch(request)
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(inner))
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopped.cancel()
                if stop.is_set():  # cut: end the stream (what came with the cut is not sent)
                    return
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            self._watches.discard(stop)
            if step is not None and not step.done():  # the inner generator is still running
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
            await inner.aclose()


def _reason(status: int) -> str:
    return {400: "BadRequest", 403: "Forbidden", 409: "Conflict", 422: "Invalid",
            429: "TooManyRequests", 503: "ServiceUnavailable",
            504: "Timeout"}.get(status, "InternalError")


@attrs.define(kw_only=True)
class UidApiServer(ApiServer):
    """:class:`ApiServer` that also gives each created object a ``metadata.uid``, as an API
    server does (ownerReferences to an object need its uid)."""

    _uids: Any = attrs.field(factory=lambda: itertools.count(1), init=False)

    def _stamp(self, request: kmock.Request) -> None:
        super()._stamp(request)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            request.data.setdefault("metadata", {}).setdefault("uid", f"uid-{next(self._uids)}")
