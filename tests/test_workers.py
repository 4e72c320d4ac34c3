"""Ray workers: the same token as in-process, an actor killed mid-run, a stale model refused, no Ray.

Every Ray here is local (127.0.0.1, 2 CPUs, no dashboard) and shut down by the test that made it.
"""
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray's import: bind 127.0.0.1 only
import ray  # noqa: E402

import edge_ti  # noqa: E402
from edge_ti import objective  # noqa: E402
from edge_ti.errors import EdgeTIError  # noqa: E402
from edge_ti.train import TrainSettings, train  # noqa: E402
from edge_ti.ray_pool import RayPool, _Place, _Worker, model_fingerprints, ray_scorer  # noqa: E402
from edge_ti.workers import InProcess, scorer_factory  # noqa: E402

SETTINGS = dict(budget=48, popsize=8, heldout_triples=6, eval_every=2, patience=0, seed=1)


@pytest.fixture(scope="module")
def in_process_run(tiny_sd, concept_dir, tmp_path_factory):
    """The reference: embedding and history of the default scorer."""
    out = str(tmp_path_factory.mktemp("in-process") / "c.safetensors")
    result = train(edge_ti.open_model(tiny_sd[1]), [concept_dir], "<c>", out, init_word="cat",
                   settings=TrainSettings(**SETTINGS))
    return result.embedding["<c>"], result


@pytest.fixture(scope="module")
def local_ray():
    """A Ray on this machine only, for the tests that make pools on an existing connection (after the
    first test, which starts and stops its own)."""
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="warning")
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    yield
    ray.shutdown()


def _history(result):
    with open(result.paths["log"]) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in f]


def test_ray_training_matches_in_process(tiny_sd, concept_dir, in_process_run, tmp_path, local_ray):
    # a Ray the pool starts (and stops) itself: test_cli_ray_local_matches_in_process
    expected, reference = in_process_run
    result = train(edge_ti.open_model(tiny_sd[1]), [concept_dir], "<c>", str(tmp_path / "c.safetensors"),
                   init_word="cat", settings=TrainSettings(**SETTINGS), make_scorer=ray_scorer(workers=2))
    assert np.array_equal(result.embedding["<c>"], expected)
    assert _history(result) == _history(reference)
    assert (result.best_heldout, result.generations) == (reference.best_heldout, reference.generations)


def _scoring_inputs(tiny_sd, seed, count):
    """(model, rng, latents [3, 4, 16, 16], prompt_ids [2, 77], COUNT triples) for a pool and InProcess."""
    model = edge_ti.open_model(tiny_sd[1])
    rng = np.random.default_rng(seed)
    latents = rng.normal(size=(3, 4, 16, 16)).astype(np.float32)
    prompt_ids = model.tokenize(["a photo of <t>", "a <t> on a table"], {"<t>": np.zeros((1, 32))})
    return model, rng, latents, prompt_ids, objective.draw_triples(rng, count, 3, 2, 1000, (4, 16, 16))


def test_pool_losses_bitwise_any_chunking_and_a_slow_actor(tiny_sd, local_ray):
    model, rng, latents, prompt_ids, triples = _scoring_inputs(tiny_sd, seed=0, count=4)
    candidates = rng.normal(0, 0.05, (12, 1, 32)).astype(np.float32)
    expected = InProcess(model, prompt_ids, latents, 20).population_loss(candidates, triples)
    pool = RayPool(model, prompt_ids, latents, 20, threads_per_worker=1)  # laid out on the nodes: 2 CPUs, 2 actors
    try:
        node = ray.get_runtime_context().get_node_id()
        assert [s.place for s in pool._slots] == [_Place(node, "cpu", 1)] * 2
        for chunk in (None, 1, 5, 12):
            pool.chunk = chunk
            assert np.array_equal(pool.population_loss(candidates, triples), expected)
        assert all(slot.chunks > 0 for slot in pool._slots)  # both actors took work
        # a slow node: worker 0 is stuck for 4 s; worker 1 scores the population, with copies of the
        # chunks stuck on worker 0, and the generation does not wait for it
        pool.chunk = 1
        stuck = pool._slots[0].actor.__ray_call__.remote(lambda self: time.sleep(4))
        start = time.perf_counter()
        assert np.array_equal(pool.population_loss(candidates, triples), expected)
        assert time.perf_counter() - start < 3.5 and pool.backups >= 1
        ray.get(stuck)
    finally:
        pool.close()
    assert ray.is_initialized()  # a pool on an existing connection leaves it connected


def test_pool_grams_bitwise_any_chunking(tiny_sd, local_ray):
    """gauss-newton's Gram matrices: chunks of triples, each actor scoring the whole population."""
    model, rng, latents, prompt_ids, triples = _scoring_inputs(tiny_sd, seed=1, count=5)
    triples.timesteps[3] = triples.timesteps[0]           # two triples at one timestep share a UNet call in-process
    triples.weight = rng.random(5)
    candidates = rng.normal(0, 0.05, (4, 1, 32)).astype(np.float32)
    expected = InProcess(model, prompt_ids, latents, 20).population_gram(candidates, triples)
    pool = RayPool(model, prompt_ids, latents, 20, workers=2)
    try:
        for chunk in (None, 1, 2, 5):
            pool.chunk = chunk
            assert np.array_equal(pool.population_gram(candidates, triples), expected)
    finally:
        pool.close()


def test_gauss_newton_on_ray_matches_in_process(tiny_sd, concept_dir, tmp_path, local_ray):
    settings = dict(optimizer="gauss-newton", budget=45, dim=8, triples=3, heldout_triples=6, eval_every=2, patience=0,
                    seed=1)
    model = edge_ti.open_model(tiny_sd[1])
    runs = [train(model, [concept_dir], "<c>", str(tmp_path / f"{i}.safetensors"), init_word="cat",
                  settings=TrainSettings(**settings), make_scorer=make_scorer)
            for i, make_scorer in enumerate((InProcess, ray_scorer(workers=2)))]
    assert np.array_equal(runs[0].embedding["<c>"], runs[1].embedding["<c>"])
    assert _history(runs[0]) == _history(runs[1]) and runs[0].generations == 5


def test_sdxl_on_ray_matches_in_process(tiny_sdxl, concept_dir, tmp_path, local_ray):
    """Ray actors open an SDXL folder as the driver does: both text encoders, text_embeds, time_ids."""
    settings = dict(budget=24, popsize=6, dim=4, triples=2, heldout_triples=4, eval_every=2, patience=0, seed=1)
    model = edge_ti.open_model(tiny_sdxl[1])
    runs = [train(model, [concept_dir], "<c>", str(tmp_path / f"{i}.safetensors"), init_word="cat",
                  settings=TrainSettings(**settings), make_scorer=make_scorer)
            for i, make_scorer in enumerate((InProcess, ray_scorer(workers=2)))]
    assert runs[0].embedding["<c>"].shape == (2, model.hidden_size)  # + the anchor ("cat")
    assert np.array_equal(runs[0].embedding["<c>"], runs[1].embedding["<c>"])
    assert _history(runs[0]) == _history(runs[1]) and runs[0].generations == 4


class _KillingPool(RayPool):
    """Kills the actor it just sent the first chunk of population_loss call `kill_call` to."""
    kill_call = 3

    def _send(self, slot, task, ref):
        super()._send(slot, task, ref)
        if task.kind == "score" and task.call == self.kill_call and not hasattr(self, "killed"):
            self.killed = slot.index
            ray.kill(slot.actor)


@pytest.mark.parametrize("max_restarts", [None, 0])
def test_actor_killed_mid_run_same_result(tiny_sd, concept_dir, in_process_run, tmp_path, local_ray, max_restarts):
    expected, reference = in_process_run
    pools = []

    def make_scorer(model, prompt_ids, latents, max_batch):
        pools.append(_KillingPool(model, prompt_ids, latents, max_batch, workers=2, max_restarts=max_restarts))
        return pools[-1]

    result = train(edge_ti.open_model(tiny_sd[1]), [concept_dir], "<c>", str(tmp_path / "c.safetensors"),
                   init_word="cat", settings=TrainSettings(**SETTINGS), make_scorer=make_scorer)
    pool, = pools
    assert pool.killed is not None and pool.lost == 1
    # replaced (a new actor under the same number), or not: the survivor finished the run alone
    assert pool.restarts == (1 if max_restarts is None else 0)
    assert np.array_equal(result.embedding["<c>"], expected)
    assert _history(result) == _history(reference)
    assert pool._slots == []  # train closed it


def test_refused_at_start_other_model_files_or_no_room(tiny_sd, tmp_path, local_ray):
    model = edge_ti.open_model(tiny_sd[1])
    prompt_ids = model.tokenize(["a photo of <t>"], {"<t>": np.zeros((1, 32))})
    latents = np.zeros((1, 4, 16, 16), np.float32)
    same = shutil.copytree(tiny_sd[1], tmp_path / "same")            # another node's identical copy
    RayPool(model, prompt_ids, latents, 20, workers=1, model_path=str(same)).close()
    stale = shutil.copytree(tiny_sd[1], tmp_path / "stale")          # another node's different UNet
    unet = stale / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[-100] ^= 0xFF
    unet.write_bytes(bytes(data))
    for options, message in [(dict(workers=3), "need 3 CPUs; the Ray cluster has 2 CPUs"),
                             (dict(workers=1, device="cuda"), "need 1 CPUs and 1 GPUs")]:
        with pytest.raises(EdgeTIError, match=message):  # at once, not after a wait for room
            RayPool(model, prompt_ids, latents, 20, **options)
    with pytest.raises(EdgeTIError) as err:
        RayPool(model, prompt_ids, latents, 20, workers=2, model_path=str(stale))
    message = str(err.value)
    assert "\n" not in message and "refused" in message
    assert "unet/model.onnx differs from the driver's copy" in message
    assert ray.is_initialized()  # refused at start: the pool cleaned up, the connection is the caller's


def test_without_ray_one_line_error(tiny_sd, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it was never installed
    assert scorer_factory("in-process") is InProcess
    for workers in ("ray", "ray-local:2"):
        with pytest.raises(EdgeTIError, match=r"^the Ray workers need Ray: pip install 'edge-ti\[ray\]'$"):
            scorer_factory(workers)
    model = edge_ti.open_model(tiny_sd[1])
    with pytest.raises(EdgeTIError, match=r"pip install 'edge-ti\[ray\]'"):
        RayPool(model, np.zeros((1, 77), np.int64), np.zeros((1, 4, 16, 16), np.float32), 20, local_workers=2)
    with pytest.raises(EdgeTIError, match="choose in-process, ray or ray-local:N"):
        scorer_factory("ray-local:zero")


def test_cli_ray_local_matches_in_process(tiny_sd, concept_dir, tmp_path):
    """`edge-ti train --workers ray-local:2` (a Ray it starts and stops itself) writes the in-process token."""
    import subprocess
    out = str(tmp_path / "ray.safetensors")
    args = ["--token", "<c>", "--init-word", "cat", "--budget", str(SETTINGS["budget"]), "--popsize",
            str(SETTINGS["popsize"]), "--heldout-triples", str(SETTINGS["heldout_triples"]), "--patience", "0",
            "--seed", str(SETTINGS["seed"])]
    from test_safe_by_default import invoke  # the in-process reference and the refusal: no interpreter start-up
    ref = str(tmp_path / "ref.safetensors")
    rc, err = invoke("train", tiny_sd[1], concept_dir, *args, "--out", ref)
    assert rc == 0, err
    proc = subprocess.run([sys.executable, "-m", "edge_ti", "train", tiny_sd[1], concept_dir, *args,
                           "--workers", "ray-local:2", "--out", out], capture_output=True, text=True,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(edge_ti.load_embedding(out)["<c>"], edge_ti.load_embedding(ref)["<c>"])
    rc, err = invoke("train", tiny_sd[1], concept_dir, *args, "--workers", "ray-local:zero", "--out", out)
    assert rc == 1 and "Traceback" not in err


def test_ray_actors_carry_the_openvino_precision(tiny_sd):
    """--precision reaches each actor's open_model (it used to be refused with Ray): an actor given a precision
    on a device other than openvino reports open_model's refusal, so the setting got there; the pool refuses
    that combination before it starts Ray."""
    model = edge_ti.open_model(tiny_sd[1])
    prompt_ids, latents = np.zeros((1, 77), np.int64), np.zeros((1, 4, 16, 16), np.float32)
    expected = model_fingerprints(tiny_sd[1])
    worker = _Worker(tiny_sd[1], "cpu", 1, expected, prompt_ids, latents, 20, precision="bf16")
    assert worker.error == "precision 'bf16' is OpenVINO's setting: it needs --device openvino", worker.error
    assert _Worker(tiny_sd[1], "cpu", 1, expected, prompt_ids, latents, 20).error is None
    with pytest.raises(EdgeTIError, match="precision 'f32' is OpenVINO's setting: it needs the workers on openvino"):
        RayPool(model, prompt_ids, latents, 20, local_workers=2, precision="f32")
    assert scorer_factory("ray-local:2", precision="f32") is not None  # refused when the pool is made, above
