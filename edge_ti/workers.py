"""Where candidates are scored. A scorer holds what every evaluation needs (the model, the
tokenized prompts, the concept latents) and turns candidates + common random numbers into losses:

    scorer = InProcess(model, prompt_ids, latents, max_batch)
    losses = scorer.population_loss(candidates [P, n, D], triples)   # -> [P]
    gram = scorer.population_gram(candidates, triples)               # -> [P, P] (gauss-newton)

Each candidate's loss does not depend on which others share its batch (checked bitwise in the
tests), so a scorer may split a population any way it likes and the search stays the same.

    InProcess     here, the whole population in one call (the default)
    RayPool       on Ray actors, one machine or many (ray_pool.py, the optional `ray` extra;
                  ray_scorer() makes one for train(), scorer_factory() maps the CLI's --workers)
"""
from . import objective
from .denoiser import Denoiser
from .errors import EdgeTIError
from .ray_pool import import_ray, ray_scorer


class InProcess:
    """Score in this process, the whole population batched (the default)."""

    def __init__(self, model, prompt_ids, latents, max_batch):
        self.denoiser, self.prompt_ids, self.latents = Denoiser(model, max_batch), prompt_ids, latents

    def population_loss(self, candidates, triples):
        return objective.population_loss(self.denoiser, candidates, self.prompt_ids, self.latents, triples)

    def population_gram(self, candidates, triples):
        return objective.population_gram(self.denoiser, candidates, self.prompt_ids, self.latents, triples)

    def close(self):
        pass


def scorer_factory(workers="in-process", ray_address=None, threads=None, device="cpu", precision="auto"):
    """The CLI's --workers: in-process | ray (a running cluster) | ray-local:N -> a make_scorer.

    threads: per actor [ray-local: 1; ray: all of each node's CPUs, one actor per node]. device: every
    actor's (auto: CUDA on GPU nodes, one actor per GPU; CPU elsewhere). precision: the actors' OpenVINO
    precision hint (device openvino only)."""
    if ray_address and workers != "ray":
        raise EdgeTIError("--ray-address goes with --workers ray")
    if workers == "in-process":
        return InProcess
    if workers == "ray":
        import_ray()
        return ray_scorer(address=ray_address, threads_per_worker=threads, device=device, precision=precision)
    count = workers[len("ray-local:"):] if workers.startswith("ray-local:") else ""
    if count.isdigit() and int(count) > 0:
        import_ray()
        return ray_scorer(local_workers=int(count), threads_per_worker=threads, device=device, precision=precision)
    raise EdgeTIError(f"--workers {workers!r}: choose in-process, ray or ray-local:N")
