"""Ray: one population, many machines. A scorer (see workers.py) whose actors score chunks of it.

    make_scorer = ray_scorer(local_workers=2)             # or ray_scorer(address="ray://head:10001")
    train(model, images, token, out, make_scorer=make_scorer)

Each actor opens the model folder once (a path every node can read; its files must match the
driver's, checked by fingerprint at actor start) and keeps the prompts and the concept latents,
sent once through the object store. Per generation the driver puts the triples in the object
store once and hands out chunks of candidates as actors become free; CMA-ES stays here.
Ray itself (the optional `ray` extra) is imported only when a pool starts or --workers names it.
"""
import collections
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import objective
from .cache import file_digest
from .denoiser import Denoiser
from .errors import EdgeTIError
from .model import open_model
from .runtime import provider_name
from .session import SessionSettings

log = logging.getLogger(__name__)

RAY_MISSING = "the Ray workers need Ray: pip install 'edge-ti[ray]'"
LOCAL_OBJECT_STORE = 128 << 20    # bytes: the store holds latents, prompts and triples (kilobytes to a few MB)


def import_ray(local_only=False):
    if local_only and "ray" not in sys.modules:
        # Ray resolves 127.0.0.1 to the machine's network address (to let other nodes join) unless
        # this is set before its import: then a one-machine Ray listens on 127.0.0.1 only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise EdgeTIError(RAY_MISSING) from None
    return ray


def model_fingerprints(path):
    """{file: fingerprint} of what scoring reads: text_encoder/*, unet/* (external data included), the
    scheduler config. Two folders score alike when these are equal."""
    prints = {}
    for part in ("text_encoder", "unet"):
        folder = os.path.join(path, part)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if os.path.isfile(os.path.join(folder, name)):
                prints[f"{part}/{name}"] = file_digest(os.path.join(folder, name))
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(config):
        prints["scheduler/scheduler_config.json"] = file_digest(config)
    return prints


def fingerprint_mismatch(path, expected):
    """None when PATH's model files are the driver's (EXPECTED), else a one-line reason."""
    found = model_fingerprints(path)
    differ = [f for f in sorted(set(found) | set(expected)) if found.get(f) != expected.get(f)]
    if not differ:
        return None
    f = differ[0]
    what = ("is missing" if f not in found else "is not in the driver's copy" if f not in expected
            else "differs from the driver's copy")
    more = f" (and {len(differ) - 1} more file(s))" if len(differ) > 1 else ""
    return f"{os.path.join(path, f)} {what}{more}: every node needs the driver's model files"


class _Worker:
    """One Ray actor: the model opened once, the prompts and latents kept; scores chunks of candidates."""

    def __init__(self, model_path, device, threads, expected, prompt_ids, latents, max_batch, precision="auto"):
        import socket
        self.where = f"{socket.gethostname()} pid {os.getpid()}"
        self.prompt_ids, self.latents = prompt_ids, latents  # (K, 77), (N, C, h, w)
        self.model, self.denoiser, self.error = None, None, None
        try:
            self.error = fingerprint_mismatch(model_path, expected)
            if self.error is None:
                settings = None if precision == "auto" else SessionSettings(precision=precision)
                self.model = open_model(model_path, device=device, threads=threads, session_settings=settings)
                self.model.text_encoder, self.model.session("unet")  # sessions now, not in generation 1
                self.denoiser = Denoiser(self.model, max_batch)
        except Exception as err:  # reported by hello(): the driver raises it as one line
            self.error = str(err).splitlines()[0] if str(err) else type(err).__name__

    def hello(self):
        return {"where": self.where, "error": self.error,
                "providers": [provider_name(p) for p in self.model.providers] if self.model else None}

    def score(self, candidates, triples):
        """candidates [c, n, D] -> (loss [c], exactly what InProcess gives these rows; seconds it took)."""
        start = time.perf_counter()
        losses = objective.population_loss(self.denoiser, candidates, self.prompt_ids, self.latents, triples)
        return losses, time.perf_counter() - start

    def grams(self, candidates, triples):
        """candidates [P, n, D], some triples -> (their Gram matrices [t, P, P] (objective.triple_grams); seconds)."""
        start = time.perf_counter()
        grams = objective.triple_grams(self.denoiser, candidates, self.prompt_ids, self.latents, triples)
        return grams, time.perf_counter() - start


@dataclass(eq=False)
class _Slot:
    actor: object
    index: int                                    # worker number, kept by a replacement
    place: object                                 # its _Place, kept by a replacement
    where: str = "starting"
    ready: bool = False                           # said hello with the driver's model files
    dead: bool = False
    running: list = field(default_factory=list)   # refs sent to it, oldest first; running[0] is executing
    free_since: float = 0.0                       # when it last answered: running[0] started then (or when sent)
    chunks: int = 0                               # chunks it scored (stats)

    def busy_for(self, tasks, now):
        """Seconds the task it is executing has run (0 when idle)."""
        return now - max(tasks[self.running[0]].sent, self.free_since) if self.running else 0.0


@dataclass(eq=False)
class _Task:
    slot: _Slot
    kind: str              # hello | score
    call: int = 0          # which population_loss call
    chunk: int = -1
    sent: float = 0.0


@dataclass(eq=False)
class _Generation:
    """One population_loss (or population_gram) call: its chunks, which are done, and their answers so far."""
    call: int                      # which call (answers of older calls are ignored)
    bounds: list                   # (start, stop) of each chunk: candidates (losses) or triples (Grams)
    parts: list                    # per chunk: its answer (losses [c] or Grams [t, P, P]) once in
    done: list                     # per chunk: its answer is in
    copies: list                   # per chunk: messages in flight (a backup makes two)
    todo: collections.deque        # chunks to send, in order (a lost actor's go back to the front)
    left: int                      # chunks not done
    times: list = field(default_factory=list)   # executing seconds of each chunk taken (for backups)

    @classmethod
    def split(cls, call, population, size):
        """POPULATION items in chunks of SIZE, none sent yet."""
        bounds = [(s, min(s + size, population)) for s in range(0, population, size)]
        n = len(bounds)
        return cls(call, bounds, [None] * n, [False] * n, [0] * n, collections.deque(range(n)), n)


@dataclass(frozen=True)
class _Place:
    """Where one actor runs and with what: a node (None: anywhere), a device, onnxruntime threads."""
    node: str
    device: str
    threads: int


class RayPool:
    """Score populations on Ray actors; on one provider the losses are InProcess's, bit for bit.

    address: a running cluster ("auto", "ray://head:10001", host:port); None: RAY_ADDRESS, else "auto"
    -- or, with local_workers=N, a new Ray on this machine only (127.0.0.1) with N actors.
    Actors: `workers` (or local_workers) of threads_per_worker [1] threads each, placed by Ray; else,
    on a cluster, one per node with all its CPUs as threads (or CPUs // threads_per_worker of them),
    and with device="auto" one CUDA actor per GPU on GPU nodes, CPU elsewhere. Only actors on the same
    provider and CPU kind as the driver's in-process run reproduce it bitwise; a mixed cluster
    reproduces it to float rounding. model_path: the folder as every node sees it [model.path]; its
    files must be the driver's (fingerprints, checked when each actor starts).
    chunk: candidates per message (triples, for population_gram) [about four chunks per actor].
    depth: messages queued per actor (2: it need not wait for the driver between chunks). An actor
    that dies has its chunks rescored on the others and is replaced (max_restarts in all [one per
    actor]); a chunk stuck behind an actor whose current chunk runs backup_after x the median gets a
    copy on an idle actor, and the first answer wins. close() kills the actors, and shuts Ray down if
    the pool started it.
    """

    def __init__(self, model, prompt_ids, latents, max_batch, address=None, local_workers=None,
                 threads_per_worker=None, device="cpu", workers=None, model_path=None, chunk=None, depth=2,
                 max_restarts=None, backup_after=2.0, start_timeout=300.0, precision="auto"):
        if precision != "auto" and device != "openvino":  # as open_model refuses it in this process
            raise EdgeTIError(f"precision {precision!r} is OpenVINO's setting: it needs the workers on openvino, "
                              f"not {device}")
        ray = self._ray = import_ray(local_only=bool(local_workers))
        self.device, self.threads, self.chunk, self.depth = device, threads_per_worker, chunk, depth
        self.precision = precision
        self.backup_after, self.start_timeout = backup_after, start_timeout
        self.model_path = os.path.abspath(model_path or model.path)
        self.expected = model_fingerprints(model.path)                # the driver's copy decides
        self._started_ray, self._slots, self._tasks = False, [], {}
        if not ray.is_initialized():
            self._connect(address, local_workers)
        try:
            places = self._places(workers or local_workers)
            self.max_restarts = len(places) if max_restarts is None else max_restarts
            self.restarts, self.backups, self.lost, self._last_loss = 0, 0, 0, None
            self.compute_seconds = 0.0                             # actors' scoring time (of chunks used)
            self._shared = (ray.put(np.ascontiguousarray(prompt_ids)), ray.put(np.ascontiguousarray(latents)),
                            max_batch)
            self._call = 0
            for i, place in enumerate(places):
                self._start(i, place)
            self._wait_for_hellos()
        except BaseException:
            self.close()
            raise

    # ---- starting ----
    def _connect(self, address, local_workers):
        ray = self._ray
        if local_workers:  # a private Ray on this machine, localhost only, no dashboard
            ray.init(address="local", num_cpus=local_workers * (self.threads or 1), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE, _node_ip_address="127.0.0.1",
                     log_to_driver=False, logging_level=logging.WARNING)
        else:
            address = address or os.environ.get("RAY_ADDRESS") or "auto"
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise EdgeTIError(f"cannot connect to Ray at {address!r} ({str(err).splitlines()[0]}): "
                                  "start one with `ray start --head` or use --workers ray-local:N") from None
        self._started_ray = True

    def _places(self, count):
        """One _Place per actor: COUNT anywhere, or laid out over the cluster's nodes."""
        if count:
            place = _Place(None, "cpu" if self.device == "auto" else self.device, self.threads or 1)
            have = self._ray.cluster_resources()
            cpus, gpus = count * place.threads, count if place.device == "cuda" else 0
            if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
                raise EdgeTIError(f"{count} {place.device} worker(s) of {place.threads} thread(s) need {cpus} CPUs"
                                  f"{f' and {gpus} GPUs' if gpus else ''}; the Ray cluster has "
                                  f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs")
            return [place] * count
        places = []
        for node in self._ray.nodes():
            resources = node.get("Resources", {})
            cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
            if not node.get("Alive") or cpus < 1:
                continue
            if self.device == "cuda" or (self.device == "auto" and gpus):
                threads = self.threads or max(1, cpus // max(gpus, 1))
                places += [_Place(node["NodeID"], "cuda", threads)] * gpus
            else:
                threads = min(self.threads or cpus, cpus)
                places += [_Place(node["NodeID"], "cpu" if self.device == "auto" else self.device, threads)] * (
                    cpus // threads)
        if not places:
            raise EdgeTIError(f"the Ray cluster has no node for a {self.device} worker "
                              f"(resources: {self._ray.cluster_resources()})")
        return places

    def _start(self, index, place):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options = {"num_cpus": place.threads, "num_gpus": 1 if place.device == "cuda" else 0}
        if place.node:  # soft: a replacement may go elsewhere if the node is gone
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(place.node, soft=True)
        if not hasattr(self, "_actor_class"):
            self._actor_class = self._ray.remote(_Worker)
        actor = self._actor_class.options(**options).remote(
            self.model_path, place.device, place.threads, self.expected, *self._shared, self.precision)
        slot = _Slot(actor, index, place)
        self._slots.append(slot)
        self._send(slot, _Task(slot, "hello"), actor.hello.remote())

    def _send(self, slot, task, ref):
        task.sent = time.perf_counter()
        self._tasks[ref] = task
        slot.running.append(ref)

    def _wait_for_hellos(self, grace=10.0):
        """Until every actor said hello, or `grace` seconds after the first did (the late ones join
        when they are ready), or start_timeout."""
        deadline, first = time.perf_counter() + self.start_timeout, None
        while any(not s.ready for s in self._slots):
            now = time.perf_counter()
            first = first or (now if self._live() else None)
            end = deadline if first is None else min(deadline, first + grace)
            ready, _ = self._ray.wait(list(self._tasks), num_returns=1, timeout=max(0.0, end - now))
            if not ready:
                break
            self._answer(ready[0], None)
        if not self._live():
            raise EdgeTIError(f"no Ray worker started: {self._last_loss}" if self._last_loss else
                              f"no Ray worker started within {self.start_timeout:.0f} s "
                              f"({len(self._slots)} asked for; does the cluster have room for them?)")
        missing = sum(not s.ready for s in self._slots)
        log.info("%d Ray worker(s) ready%s", len(self._live()), f", {missing} still starting" if missing else "")

    def _live(self):
        return [s for s in self._slots if s.ready]

    # ---- answers ----
    def _lost(self, slot, err):
        """An actor died (or cannot be reached): forget it, start a replacement while restarts last."""
        if slot.dead:
            return
        slot.dead, slot.ready = True, False
        self.lost += 1
        self._slots.remove(slot)
        try:
            self._ray.kill(slot.actor)
        except Exception:
            pass
        reason = self._last_loss = str(err).splitlines()[0] if str(err) else type(err).__name__
        if self.restarts < self.max_restarts:
            self.restarts += 1
            log.warning("Ray worker %d (%s) lost: %s; its chunks go to the others, starting a replacement",
                        slot.index, slot.where, reason)
            self._start(slot.index, slot.place)
        else:
            log.warning("Ray worker %d (%s) lost: %s; no restarts left, %d worker(s) go on",
                        slot.index, slot.where, reason, len(self._live()))

    def _answer(self, ref, generation):
        """Take one finished ref: a hello, a chunk's losses (into GENERATION), or a lost actor."""
        ray = self._ray
        now = time.perf_counter()
        elapsed = now - max(self._tasks[ref].sent, self._tasks[ref].slot.free_since)   # executing time
        task = self._tasks.pop(ref)
        slot = task.slot
        if ref in slot.running:
            slot.running.remove(ref)
        slot.free_since = now
        ours = generation is not None and task.kind == "score" and task.call == generation.call
        if ours:
            generation.copies[task.chunk] -= 1
        try:
            value = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
            self._lost(slot, err)
            if ours and not generation.done[task.chunk] and generation.copies[task.chunk] == 0:
                generation.todo.appendleft(task.chunk)         # rescored on the others
            return
        except ray.exceptions.TaskCancelledError:
            return
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, EdgeTIError):
                raise EdgeTIError(str(cause)) from None
            raise
        if task.kind == "hello":
            if value["error"]:
                raise EdgeTIError(f"Ray worker {slot.index} on {value['where']} refused: {value['error']}")
            slot.where, slot.ready = value["where"], not slot.dead
            log.info("Ray worker %d on %s: %s", slot.index, slot.where, ", ".join(value["providers"]))
        elif ours and not generation.done[task.chunk]:
            generation.parts[task.chunk], seconds = value
            self.compute_seconds += seconds
            generation.done[task.chunk] = True
            generation.left -= 1
            generation.times.append(elapsed)
            slot.chunks += 1

    def _send_backups(self, generation, send):
        """Idle actors take copies of the chunks queued on an actor whose current chunk has run more
        than backup_after x the median chunk (the first answer wins). -> seconds until the next look,
        or None to wait for an answer."""
        idle = [s for s in self._live() if not s.running]
        if not idle or not generation.times:
            return None
        limit = self.backup_after * float(np.median(generation.times))
        now, timeout = time.perf_counter(), None
        for slot in self._live():
            tasks = [self._tasks[r] for r in slot.running]
            stuck = [t.chunk for t in tasks if t.kind == "score" and t.call == generation.call
                     and not generation.done[t.chunk] and generation.copies[t.chunk] == 1]
            if not stuck:
                continue
            late_by = slot.busy_for(self._tasks, now) - limit
            if late_by <= 0:
                timeout = min(timeout or np.inf, max(0.001, -late_by))
                continue
            while stuck and idle:
                send(idle.pop(), stuck.pop())
                self.backups += 1
        return timeout

    # ---- the scorer interface ----
    def population_loss(self, candidates, triples):
        """candidates [P, n, D] -> loss [P] (float64), chunks of candidates handed out as actors become free."""
        candidates = np.asarray(candidates, dtype=np.float32)
        triples_ref = self._ray.put(triples)                     # once per generation, read by every actor

        def message(actor, start, stop):
            return actor.score.remote(candidates[start:stop], triples_ref)
        return np.concatenate(self._scatter(len(candidates), message))

    def population_gram(self, candidates, triples):
        """candidates [P, n, D] -> G [P, P] (objective.population_gram): chunks of triples, every actor
        scoring the whole population on its own triples; their Gram matrices are averaged in order."""
        candidates_ref = self._ray.put(np.asarray(candidates, dtype=np.float32))

        def message(actor, start, stop):
            return actor.grams.remote(candidates_ref, objective.subset(triples, slice(start, stop)))
        return objective.mean_gram(np.concatenate(self._scatter(len(triples.timesteps), message)))

    def _scatter(self, count, message):
        """COUNT items in chunks, message(actor, start, stop) -> a ref per chunk sent; -> the answers in order."""
        ray = self._ray
        size = self.chunk or max(1, count // (4 * max(1, len(self._live()) or len(self._slots))))
        self._call += 1
        generation = _Generation.split(self._call, count, size)
        todo = generation.todo

        def send(slot, c):
            generation.copies[c] += 1
            self._send(slot, _Task(slot, "score", self._call, c), message(slot.actor, *generation.bounds[c]))

        while generation.left:
            # 1. hand out chunks breadth-first: every free actor one, then a second (depth) ...
            for level in range(1, self.depth + 1):
                for slot in self._live():
                    if todo and len(slot.running) < level:
                        send(slot, todo.popleft())
            # 2. backups for chunks stuck on a slow or hung actor
            timeout = self._send_backups(generation, send) if not todo else None
            if not self._tasks:
                raise EdgeTIError(f"no Ray workers left: all died and the restarts are used up "
                                  f"(last: {self._last_loss})")
            if not self._live():                                   # only replacements starting
                timeout = self.start_timeout
            # 3. take the next answer: losses, a hello, or a lost actor (its chunks go back to todo)
            ready, _ = ray.wait(list(self._tasks), num_returns=1, timeout=timeout)
            if not ready and not self._live():
                raise EdgeTIError(f"no Ray workers left: no replacement started within {self.start_timeout:.0f} s")
            for ref in ready:
                self._answer(ref, generation)
        for ref, task in list(self._tasks.items()):                # copies no longer needed
            if task.kind == "score" and task.call == self._call:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
        return generation.parts

    def close(self):
        ray = getattr(self, "_ray", None)
        for slot in getattr(self, "_slots", []):
            try:
                ray.kill(slot.actor)
            except Exception:
                pass
        self._slots, self._tasks = [], {}
        if getattr(self, "_started_ray", False) and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False


def ray_scorer(**options):
    """A make_scorer for train(): each call opens a RayPool(model, prompt_ids, latents, max_batch, **options)."""
    def make_scorer(model, prompt_ids, latents, max_batch):
        return RayPool(model, prompt_ids, latents, max_batch, **options)
    return make_scorer
