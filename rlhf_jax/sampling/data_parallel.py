"""Data-parallel continuous batching: one `ContinuousBatcher` engine per data-parallel group of a
sampler's mesh, fed from one shared arrival-order queue (vLLM's data-parallel engines).
`Sampler.continuous_batcher` and `Sampler.generate_requests` build a `DataParallelBatcher` when the
sampler has a mesh; its docstring says how groups, queue, weights and processes work. Within a
group an engine keeps the sampler's layout: tensor-parallel weights and the pool's kv heads split
over `tensor` on a data x tensor mesh, the rest of the slot state replicated.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.sampling.continuous import ContinuousBatcher, ContinuousSession, ContinuousStats
from rlhf_jax.sampling.requests import Request, RequestOutput

__all__ = ["DataParallelBatcher", "DataParallelSession"]


class DataParallelBatcher:
    """Data-parallel continuous batching: one `ContinuousBatcher` engine per data-parallel group of a
    sampler's mesh, fed from one shared arrival-order queue (vLLM's data-parallel engines).

    The groups are the devices of one index of the sampler's batch axes (its strategy's `batch_axes`
    present in the mesh, e.g. `data`); each keeps the mesh's other axes (e.g. `tensor`), so an
    engine's weights keep the sampler's within-group layout (one device each on a pure dp mesh).
    `run` drives every engine from its own host thread (JAX dispatch is asynchronous and device
    waits release the GIL, so the engines decode at once): an engine takes the next waiting request
    whenever its slots have room for it, so requests are admitted in arrival order, and the outputs
    come back in request order. Draws are keyed by request (a request without a seed gets
    `fold_in(key(rng), its index in the call)`), so the outputs do not depend on which engine served
    a request and equal the one-device batcher's. `session` is the incremental form
    (`DataParallelSession`: each `advance` runs one segment on every busy engine at once).

    Weights: `Sampler.load_params` (one hand-off program on the whole mesh) already places a copy of
    the weights on every data-parallel group (parameters replicated over the batch axes); each
    engine's tree is assembled from the shards on its own devices, no copy. A strategy that shards
    parameters over a batch axis (e.g. fsdp) gets its per-engine copies by `jax.device_put`.

    Multi-process: the engines are the groups whose devices this process holds; each process serves
    the requests it is given (its own local rows, as `RolloutCollector` passes them) on its engines.

    Args:
      sampler: a `Sampler` with a mesh.
      **options: `ContinuousBatcher` options, per engine (`num_slots` slots each).
    """

    def __init__(self, sampler, **options):
        mesh = sampler.mesh
        if mesh is None:
            raise ValueError("DataParallelBatcher: the Sampler has no mesh; use ContinuousBatcher")
        names = mesh.axis_names
        self.row_axes = tuple(a for a in sampler.strategy.batch_axes if a in names and mesh.shape[a] > 1)
        keep = tuple(a for a in names if a not in self.row_axes)
        devices = np.moveaxis(mesh.devices, [names.index(a) for a in self.row_axes],
                              list(range(len(self.row_axes))))
        local = jax.process_index()
        groups = devices.reshape((-1,) + devices.shape[len(self.row_axes):])
        self.meshes = [Mesh(g, keep) for g in groups if all(d.process_index == local for d in g.flat)]
        if not self.meshes:
            raise ValueError("DataParallelBatcher: no data-parallel group of the sampler's mesh is on this process")
        self.sampler = sampler
        self.engines = [ContinuousBatcher(sampler, mesh=m, **options) for m in self.meshes]
        self.num_slots = self.engines[0].num_slots

    @property
    def stats(self) -> ContinuousStats:
        """The engines' `ContinuousStats` of the last call, summed (peak blocks: summed peaks)."""
        total = ContinuousStats(block_size=self.engines[0].block_size)
        for e in self.engines:
            for f in dataclasses.fields(ContinuousStats):
                if f.name != "block_size":
                    setattr(total, f.name, getattr(total, f.name) + getattr(e.stats, f.name))
        return total

    def engine_params(self, params) -> list:
        """Each engine's `SamplerParams` on its own devices, from the sampler's (or raw) parameters."""
        from rlhf_jax.sampling.sampler import SamplerParams

        if not isinstance(params, SamplerParams):
            params = self.sampler.load_params(params)
        drop = set(self.row_axes)

        def sub_spec(spec):
            def strip(entry):
                if entry is None:
                    return None
                axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a not in drop)
                return None if not axes else (axes[0] if len(axes) == 1 else axes)
            return PartitionSpec(*(strip(e) for e in spec))

        def place(leaf, mesh):
            sharding = getattr(leaf, "sharding", None)
            if not isinstance(sharding, NamedSharding):
                return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))
            target = NamedSharding(mesh, sub_spec(sharding.spec))
            used = {a for e in sharding.spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
            if used & drop:          # split over a batch axis: gather this group's copy
                return jax.device_put(leaf, target)
            shards = {s.device: s.data for s in leaf.addressable_shards}
            return jax.make_array_from_single_device_arrays(
                leaf.shape, target, [shards[d] for d in mesh.devices.flat])

        return [SamplerParams(jax.tree.map(lambda a: place(a, m), params.tree)) for m in self.meshes]

    def run(self, params, requests: Sequence[Request], *, rng: int | jax.Array = 0,
            max_segment_steps: int | None = None) -> list[RequestOutput]:
        """Every request's completions, in request order (see the class docstring); `stats` sums the engines'."""
        if not isinstance(requests, Request):
            requests = list(requests)         # an iterator: read once (`_check` would consume it)
        call_key = self._check(requests, rng)
        queue = collections.deque((i, _keyed(req, call_key, i)) for i, req in enumerate(requests))
        lock = threading.Lock()
        results: list = [None] * len(requests)
        errors: list = []
        trees = self.engine_params(params)

        def serve(engine: ContinuousBatcher, tree) -> None:
            try:
                session = engine.session(tree, rng=0, max_segment_steps=max_segment_steps)
                handles: dict[int, int] = {}
                while not errors:
                    with lock:
                        _feed(session, queue, handles)
                        if session.idle and not queue:
                            return
                    for handle, out in session.advance().items():
                        results[handles[handle]] = out
            except BaseException as exc:   # noqa: BLE001 - re-raised by the calling thread
                errors.append(exc)

        threads = [threading.Thread(target=serve, args=(e, t), name=f"rlhf_jax_engine{k}", daemon=True)
                   for k, (e, t) in enumerate(zip(self.engines, trees))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def _check(self, requests, rng) -> jax.Array:
        """Validate the requests up front (errors name the request's index in the call); the call's key."""
        from rlhf_jax.sampling.arguments import _as_key

        if isinstance(requests, Request) or not all(isinstance(r, Request) for r in requests):
            raise TypeError("generate_requests: requests must be a sequence of Request")
        if not requests:
            raise ValueError("generate_requests: no requests")
        dummy = np.zeros(self.engines[0]._key_shape, np.uint32)
        for i, req in enumerate(requests):
            self.engines[0]._request_arrays(i, req, dummy)
        return _as_key(rng)

    def session(self, params, *, rng: int | jax.Array = 0,
                max_segment_steps: int | None = None) -> "DataParallelSession":
        """The incremental form over the engines (`ContinuousSession`'s interface): `advance` feeds
        the engines from the shared queue and runs one segment on each busy engine, concurrently."""
        return DataParallelSession(self, params, rng=rng, max_segment_steps=max_segment_steps)


def _keyed(req: Request, call_key, i: int) -> Request:
    """`req` with its draw key fixed: its own seed, else `fold_in(call key, its index in the call)`."""
    return req if req.seed is not None else dataclasses.replace(req, seed=jax.random.fold_in(call_key, i))


def _feed(session: ContinuousSession, queue: collections.deque, handles: dict) -> None:
    """Move the next waiting requests of the shared `queue` into `session` while its slots have room
    for them (arrival order: an engine takes the queue's head or nothing); `handles`: local -> global."""
    room = session.batcher.num_slots - session.running - sum(len(e.samples) for e in session._waiting)
    while queue and queue[0][1].num_samples <= room:
        i, req = queue.popleft()
        handles[session.submit(req)] = i
        room -= req.num_samples


class DataParallelSession:
    """An open call over a `DataParallelBatcher`'s engines (`submit` / `advance` / `idle`, as
    `ContinuousSession`): `advance` feeds each engine from the shared arrival-order queue, runs one
    segment on every busy engine (one host thread each) and returns `{handle: RequestOutput}`."""

    def __init__(self, batcher: DataParallelBatcher, params, *, rng: int | jax.Array = 0,
                 max_segment_steps: int | None = None):
        from rlhf_jax.sampling.arguments import _as_key

        self.batcher, self._call_key = batcher, _as_key(rng)
        self.sessions = [e.session(t, rng=0, max_segment_steps=max_segment_steps)
                         for e, t in zip(batcher.engines, batcher.engine_params(params))]
        self._handles: list[dict[int, int]] = [{} for _ in self.sessions]
        self._queue: collections.deque = collections.deque()
        self.requests: list[Request] = []

    def submit(self, request: Request) -> int:
        """Queue `request` (taken by an engine at the next `advance`); returns its handle (submission index)."""
        if not isinstance(request, Request):
            raise TypeError(f"DataParallelSession.submit: expected a Request, got {type(request).__name__}")
        i = len(self.requests)
        engine = self.batcher.engines[0]
        engine._request_arrays(i, request, np.zeros(engine._key_shape, np.uint32))   # errors name handle i
        self.requests.append(request)
        self._queue.append((i, _keyed(request, self._call_key, i)))
        return i

    @property
    def running(self) -> int:
        """Samples decoding in the engines' slots now."""
        return sum(s.running for s in self.sessions)

    @property
    def waiting(self) -> int:
        """Requests in the shared queue plus entries waiting inside an engine."""
        return len(self._queue) + sum(s.waiting for s in self.sessions)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting: every submitted request has come back."""
        return not self._queue and all(s.idle for s in self.sessions)

    def advance(self) -> dict[int, RequestOutput]:
        """Feed the engines, run one segment on each busy engine at once, collect the finished requests."""
        for session, handles in zip(self.sessions, self._handles):
            _feed(session, self._queue, handles)
        busy = [k for k, s in enumerate(self.sessions) if not s.idle]
        outs: list = [None] * len(self.sessions)
        errors: list = []

        def step(k: int) -> None:
            try:
                outs[k] = self.sessions[k].advance()
            except BaseException as exc:   # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=step, args=(k,), daemon=True) for k in busy[1:]]
        for t in threads:
            t.start()
        if busy:
            step(busy[0])
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return {self._handles[k][h]: out for k in busy for h, out in outs[k].items()}
