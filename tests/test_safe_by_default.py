"""Hostile files and careless reruns: no code from files, no clobbered files, no lost runs.

Every case asserts the exact outcome: one line on stderr (no traceback), a non-zero exit, nothing
half-written, no code run, the inputs untouched.
"""
import importlib
import json
import os
import pickle
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import edge_ti
from edge_ti import search
from edge_ti.cli import cli
from edge_ti.errors import EdgeTIError
from edge_ti.files import FileLock

train_module = importlib.import_module("edge_ti.train")  # edge_ti.train is also the name of the function

TRAIN = ["--token", "<c>", "--init-word", "cat", "--popsize", "6", "--seed", "1"]


def run_cli(*args, preexec_fn=None):
    proc = subprocess.run([sys.executable, "-m", "edge_ti", *args], capture_output=True, text=True,
                          preexec_fn=preexec_fn)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(rc, err, *needles):
    """A non-zero exit whose stderr ends with the one line that names the problem (warnings and
    progress lines may come before it), and no traceback."""
    assert rc not in (0, None), err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and len([line for line in lines if line.startswith("Error:")]) <= 1, err
    for needle in needles:
        assert needle in lines[-1], err
    return lines[-1]


def invoke(*args):
    """The CLI in this process (no interpreter start-up): (exit code, stderr)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def snapshot(folder):
    return {name: (os.lstat(os.path.join(folder, name)).st_mode, os.lstat(os.path.join(folder, name)).st_size)
            for name in sorted(os.listdir(folder))}


# ---- 1. a crafted checkpoint runs no code ----

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls os.mkdir(marker)
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_crafted_pickle_checkpoint_runs_no_code(tiny_sd, concept_dir, tmp_path, resume):
    out = tmp_path / "c.safetensors"
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "c.ckpt"
    checkpoint.write_bytes(pickle.dumps({"version": 1, "state": _Payload(str(marker))}))
    before = checkpoint.read_bytes()
    rc, _, err = run_cli("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "12", *resume, "--out", str(out))
    one_line_error(rc, err, str(checkpoint), "never loads", "--restart")
    assert not marker.exists()                           # nothing ran
    assert checkpoint.read_bytes() == before             # the input is untouched
    assert sorted(os.listdir(tmp_path)) == ["c.ckpt"]    # nothing written, no lock left


def test_checkpoint_is_data_and_every_field_is_checked(tmp_path):
    state = search.SearchState("key", 3, 0.5, 4, 0)
    es = search.replay(state)
    for _ in range(2):
        search.step(state, es, lambda zs, g: np.sum(zs ** 2, axis=1), lambda zs: np.sum(zs ** 2, axis=1), 1)
    path = str(tmp_path / "s.ckpt")
    search.save_checkpoint(path, state)
    loaded = search.load_checkpoint(path, "key")
    assert loaded.generation == 2 and np.array_equal(loaded.best_z, state.best_z)
    assert [list(x) for x in loaded.losses] == [list(x) for x in state.losses]
    # the replayed optimizer asks what the original would have asked next
    assert np.array_equal(np.array(search.replay(loaded).ask()), np.array(es.ask()))
    with pytest.raises(EdgeTIError, match="other settings"):
        search.load_checkpoint(path, "another key")
    # a checkpoint whose header length's first byte is 0x80 (a pickle's first byte) is still ours
    for pad in range(256):
        state.stop_reason = "x" * pad
        search.save_checkpoint(path, state)
        if open(path, "rb").read(1) == b"\x80":
            assert search.load_checkpoint(path, "key").stop_reason == state.stop_reason
            break
    else:
        raise AssertionError("no padding gave a header length ending in 0x80")

    from safetensors.numpy import load_file, save_file
    arrays = load_file(path)
    header = json.loads(edge_ti.embeddings.read_metadata(path)["edge_ti.checkpoint"])
    for field, value in [("generation", -1), ("generation", "2"), ("dim", 3.5), ("history", {}), ("version", 1),
                         ("sigma0", "0.5"), ("popsize", True)]:
        save_file(arrays, path, metadata={"edge_ti.checkpoint": json.dumps({**header, field: value})})
        with pytest.raises(EdgeTIError, match="not a usable edge-ti checkpoint"):
            search.load_checkpoint(path, "key")
    save_file({**arrays, "losses": arrays["losses"][:1]}, path, metadata={"edge_ti.checkpoint": json.dumps(header)})
    with pytest.raises(EdgeTIError, match="shapes"):
        search.load_checkpoint(path, "key")
    # recorded losses that do not replay to the recorded populations are refused
    save_file({**arrays, "losses": arrays["losses"][::-1].copy()}, path,
              metadata={"edge_ti.checkpoint": json.dumps(header)})
    with pytest.raises(EdgeTIError, match="does not replay"):
        search.run(search.load_checkpoint(path, "key"), None, None, search.Limits(budget=1), checkpoint=path)


# ---- 2. --out never replaces what is not a regular file ----

def _special_outputs(folder):
    target = folder / "precious.txt"
    target.write_text("keep me")
    fifo = folder / "fifo.safetensors"
    os.mkfifo(fifo)
    (folder / "link.safetensors").symlink_to(target)
    (folder / "dir.safetensors").mkdir()
    (folder / "afile").write_text("a file, not a folder")
    return {"fifo": (str(fifo), "not a regular file"),
            "symlink": (str(folder / "link.safetensors"), "symbolic link"),
            "folder": (str(folder / "dir.safetensors"), "a folder"),
            "under a file": (str(folder / "afile" / "x.safetensors"), "Not a directory")}


def test_out_refuses_special_files(tiny_sd, concept_dir, tmp_path):
    cases = _special_outputs(tmp_path)
    try:  # a character device like /dev/null (needs CAP_MKNOD)
        os.mknod(tmp_path / "null.safetensors", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        cases["device"] = (str(tmp_path / "null.safetensors"), "not a regular file")
    except OSError:
        pass
    before = snapshot(tmp_path)
    for name, (out, message) in cases.items():
        rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "12", "--out", out)
        assert rc == 1, (name, err)
        one_line_error(rc, err, out, message)
    # a checkpoint path beside a good --out that is a FIFO is refused too, before any work
    os.mkfifo(tmp_path / "good.ckpt")
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--out", str(tmp_path / "good.safetensors"))
    one_line_error(rc, err, "good.ckpt", "not a regular file")
    assert snapshot(tmp_path) == {**before, "good.ckpt": snapshot(tmp_path)["good.ckpt"]}
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_generate_refuses_special_files(tiny_sd, tmp_path):
    os.mkfifo(tmp_path / "seed0-00.png")
    rc, err = invoke("generate", tiny_sd[1], "a cat", "--n", "1", "--steps", "2", "--out", str(tmp_path))
    one_line_error(rc, err, "seed0-00.png", "not a regular file")
    assert sorted(os.listdir(tmp_path)) == ["seed0-00.png"]


# ---- 3. reruns resume, refuse, or restart; Ctrl-C writes the best so far ----

def test_rerun_resumes_refuses_or_restarts(tiny_sd, concept_dir, tmp_path):
    out = str(tmp_path / "c.safetensors")
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "24", "--out", out)
    assert rc == 0, err
    first = edge_ti.load_embedding(out)["<c>"]
    first_log = [json.loads(line)["best_loss"] for line in open(tmp_path / "c.log.jsonl")]
    # the same command with a larger budget continues from generation 4
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "48", "--out", out)
    assert rc == 0 and "resuming" in err and "at generation 4 (24 evaluations)" in err, err
    assert len(open(tmp_path / "c.log.jsonl").read().splitlines()) == 8
    # other settings: refused in one line naming --restart, nothing changed
    resumed = (tmp_path / "c.ckpt").read_bytes()
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN[:-1], "2", "--budget", "24", "--out", out)
    one_line_error(rc, err, "c.ckpt", "other settings", "--restart")
    assert (tmp_path / "c.ckpt").read_bytes() == resumed
    # --restart discards it and gives the first run's result again
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "24", "--restart", "--out", out)
    assert rc == 0, err
    assert np.array_equal(edge_ti.load_embedding(out)["<c>"], first)
    assert [json.loads(line)["best_loss"] for line in open(tmp_path / "c.log.jsonl")] == first_log
    # an OUT that is someone's file, with no checkpoint beside it, is not overwritten
    other = tmp_path / "theirs.safetensors"
    edge_ti.save_embedding(str(other), {"<t>": np.ones((1, 32), np.float32)})
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "12", "--out", str(other))
    one_line_error(rc, err, str(other), "already exists", "--restart")
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "12", "--resume",
                     "--out", str(tmp_path / "none.safetensors"))
    one_line_error(rc, err, "none.ckpt", "no checkpoint")
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--resume", "--restart", "--out", out)
    one_line_error(rc, err, "--resume", "--restart")


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell may start background jobs with SIGINT ignored


def test_ctrl_c_writes_the_best_so_far_and_the_rerun_ends_where_an_unbroken_run_does(tiny_sd, concept_dir,
                                                                                       tmp_path):
    args = [tiny_sd[1], concept_dir, *TRAIN, "--budget", "120", "--popsize", "8",  # 15 generations
            "--triples", "2", "--heldout-triples", "8"]
    whole = str(tmp_path / "whole.safetensors")
    rc, err = invoke("train", *args, "--out", whole)
    assert rc == 0, err

    out, log = str(tmp_path / "c.safetensors"), tmp_path / "c.log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "edge_ti", "train", *args, "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    def generations():
        return len(log.read_text().splitlines()) if log.exists() else 0
    while time.time() < deadline and proc.poll() is None and generations() < 3:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    line = one_line_error(proc.returncode, err, "interrupted at generation", out, "run the same command again")
    assert "training, evaluations: 8/120" in err  # progress lines although stderr is no terminal
    done = int(line.split("interrupted at generation ")[1].split()[0])
    assert 3 <= done < 15
    assert edge_ti.load_embedding(out)["<c>"].shape == (2, 32)   # the best so far (+ the anchor), written
    assert not (tmp_path / "c.lock").exists()
    rc, err = invoke("train", *args, "--out", out)               # the same command continues
    assert rc == 0 and f"at generation {done}" in err, err
    assert np.array_equal(edge_ti.load_embedding(out)["<c>"], edge_ti.load_embedding(whole)["<c>"])
    assert len(log.read_text().splitlines()) == 15


# ---- 4. two runs on one --out ----

def test_second_run_on_the_same_out_is_refused(tiny_sd, concept_dir, tmp_path):
    out = str(tmp_path / "c.safetensors")
    with FileLock(str(tmp_path / "c.lock"), "test"):  # held as a running `edge-ti train` holds it
        rc, _, err = run_cli("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "12", "--out", out)
        one_line_error(rc, err, "c.lock", "another edge-ti process")
        assert sorted(os.listdir(tmp_path)) == ["c.lock"]
    assert not (tmp_path / "c.lock").exists()
    first = subprocess.Popen([sys.executable, "-m", "edge_ti", "train", tiny_sd[1], concept_dir, *TRAIN,
                              "--budget", "100000", "--patience", "0", "--out", out],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "c.log.jsonl").exists():
            time.sleep(0.02)
        rc, _, err = run_cli("train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "12", "--out", out)
        one_line_error(rc, err, "another edge-ti process")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


# ---- 5. a full disk: one line, nothing half-written ----

def test_full_disk_is_one_line_and_leaves_nothing(tiny_sd, concept_dir, tmp_path):
    args = ["train", tiny_sd[1], concept_dir, *TRAIN, "--budget", "12"]
    rc, err = invoke(*args, "--out", str(tmp_path / "warm" / "c.safetensors"))  # fill the caches first
    assert rc == 0, err
    limit = 256  # bytes: less than any checkpoint

    def small_disk():  # writes past LIMIT bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    full = tmp_path / "full"
    full.mkdir()
    rc, _, err = run_cli(*args, "--out", str(full / "c.safetensors"), preexec_fn=small_disk)
    one_line_error(rc, err, "c.ckpt", "cannot write", "too large")
    assert os.listdir(full) == []  # no temp file, no half checkpoint, no lock


def test_stale_temp_files_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".tmp-{dead.pid}@{host}~x.safetensors"
    live = tmp_path / f".tmp-{os.getppid()}@{host}~y.safetensors"  # a process that still runs
    elsewhere = tmp_path / f".tmp-{dead.pid}@another-machine~z.safetensors"  # its pid means nothing here
    for path in (stale, live, elsewhere):
        path.write_bytes(b"half")
    edge_ti.save_embedding(str(tmp_path / "e.safetensors"), {"<t>": np.ones((1, 4), np.float32)})
    assert sorted(os.listdir(tmp_path)) == sorted(["e.safetensors", live.name, elsewhere.name])


# ---- 6, 10. hostile embedding files ----

def _safetensors(header, data=b""):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _f32(n, d, value=1.0):
    return np.full((n, d), value, np.float32).tobytes()


HOSTILE = {
    "list header": (_safetensors([1, 2]), "not an object"),
    "null header": (_safetensors(None), "not an object"),
    "string entry": (_safetensors({"<t>": "x"}), "not an object"),
    "negative shape": (_safetensors({"<t>": {"dtype": "F32", "shape": [-1, 32], "data_offsets": [0, 128]}},
                                    _f32(1, 32)), "shape"),
    "huge shape": (_safetensors({"<t>": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 128]}},
                                _f32(1, 32)), "does not match"),
    "string offsets": (_safetensors({"<t>": {"dtype": "F32", "shape": [1, 32], "data_offsets": ["0", "128"]}},
                                    _f32(1, 32)), "data_offsets"),
    "odd dtype": (_safetensors({"<t>": {"dtype": "I64", "shape": [1, 4], "data_offsets": [0, 32]}}, bytes(32)),
                  "dtype I64"),
    "metadata list": (_safetensors({"__metadata__": [1], "<t>": {"dtype": "F32", "shape": [1, 32],
                                                                  "data_offsets": [0, 128]}}, _f32(1, 32)),
                      "__metadata__"),
    "NaN": (_safetensors({"<t>": {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, 128]}},
                         _f32(1, 32, np.nan)), "NaN"),
    "Inf": (_safetensors({"<t>": {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, 128]}},
                         _f32(1, 32, np.inf)), "infinite"),
    "0 vectors": (_safetensors({"<t>": {"dtype": "F32", "shape": [0, 32], "data_offsets": [0, 0]}}), "0 vectors"),
    "1000 vectors": (_safetensors({"<t>": {"dtype": "F32", "shape": [1000, 32], "data_offsets": [0, 128000]}},
                                  _f32(1000, 32)), "1000 vectors"),
    "empty name": (_safetensors({"": {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, 128]}}, _f32(1, 32)),
                   "empty"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_embedding_files_are_one_line(tiny_sd, tmp_path, case):
    raw, message = HOSTILE[case]
    path = tmp_path / "e.safetensors"
    path.write_bytes(raw)
    rc, err = invoke("tokenize", tiny_sd[1], "a <t>", "--embedding", path)
    one_line_error(rc, err, str(path), message)
    assert path.read_bytes() == raw


def test_embedding_that_is_a_fifo_does_not_hang(tiny_sd, tmp_path):
    fifo = tmp_path / "e.safetensors"
    os.mkfifo(fifo)
    rc, err = invoke("tokenize", tiny_sd[1], "a", "--embedding", fifo)  # would block forever in open()
    one_line_error(rc, err, str(fifo), "not a regular file")


def test_save_refuses_nonfinite_vectors(tmp_path):
    with pytest.raises(EdgeTIError, match="NaN"):
        edge_ti.save_embedding(str(tmp_path / "e.safetensors"), {"<t>": np.full((1, 4), np.nan)})
    assert os.listdir(tmp_path) == []


# ---- 11. options out of range: one line at parse time, before the model is opened ----

@pytest.mark.parametrize("option", [
    ["--popsize", "0"], ["--popsize", "1"], ["--dim", "0"], ["--vectors", "0"], ["--vectors", "76"],
    ["--seed", "-1"], ["--sigma", "nan"], ["--sigma", "-1"], ["--triples", "0"], ["--heldout-triples", "0"],
    ["--eval-every", "0"], ["--eval-every", "x"], ["--clip-line", "1"], ["--clip-line", "-1"], ["--clip-line", "2.5"],
    ["--clip-path", "-1"], ["--clip-path", "2.5"], ["--clip-path", "x"],
    ["--max-batch", "-1"], ["--budget", "-5"], ["--patience", "-1"], ["--max-time", "0"], ["--max-time", "-5m"],
    ["--resolution", "100000"], ["--threads", "0"], ["--init-top-k", "0"], ["--loss-weighting", "v"],
    ["--timesteps", "importance"],
])
def test_train_options_out_of_range(concept_dir, tmp_path, option):
    out = tmp_path / "o.safetensors"
    rc, err = invoke("train", tmp_path / "no-model-here", concept_dir, *TRAIN, *option, "--out", out)
    one_line_error(rc, err, option[0].lstrip("-").split("-")[0])
    assert "no such model folder" not in err  # refused before the model folder is looked at
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command, option", [
    ("generate", ["--n", "100000"]), ("generate", ["--size", "1000000"]), ("generate", ["--seed", "-3"]),
    ("generate", ["--guidance", "nan"]), ("generate", ["--steps", "0"]), ("evaluate", ["--n", "0"]),
])
def test_generate_options_out_of_range(tmp_path, command, option):
    args = ["a cat", "--out", tmp_path / "o"] if command == "generate" else ["--embedding", "e", "--images", "i"]
    rc, err = invoke(command, tmp_path / "no-model-here", *args, *option)
    one_line_error(rc, err, option[0])
    assert os.listdir(tmp_path) == []


def test_template_with_another_field_is_one_line(tiny_sd, concept_dir, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of {} by {name}\n")
    rc, err = invoke("train", tiny_sd[1], concept_dir, *TRAIN, "--template", templates, "--out",
                     tmp_path / "o.safetensors")
    one_line_error(rc, err, "exactly one {}")


def test_loss_curve_is_redrawn_during_the_run(tiny_sd, concept_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "CURVE_EVERY", 0.0)
    curve = tmp_path / "c.loss.png"
    seen = []
    train_module.train(edge_ti.open_model(tiny_sd[1]), [concept_dir], "<c>", str(tmp_path / "c.safetensors"),
                       init_word="cat", settings=train_module.TrainSettings(budget=12, popsize=6),
                       on_generation=lambda record, state: seen.append(curve.exists()))
    assert seen == [True, True]


def test_kills_at_random_points_lose_nothing(tiny_sd, concept_dir, tmp_path):
    args = [tiny_sd[1], concept_dir, *TRAIN, "--budget", "96", "--triples", "2", "--heldout-triples", "8"]
    rc, err = invoke("train", *args, "--out", tmp_path / "whole.safetensors")
    assert rc == 0, err
    out = str(tmp_path / "c.safetensors")
    rng = np.random.default_rng(7)
    for delay in rng.uniform(0.3, 2.5, size=3):  # start-up, model loading, encoding, the search, a write
        proc = subprocess.Popen([sys.executable, "-m", "edge_ti", "train", *args, "--out", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        checkpoint = str(tmp_path / "c.ckpt")
        if os.path.exists(checkpoint):  # whatever is there is whole
            key = json.loads(edge_ti.embeddings.read_metadata(checkpoint)["edge_ti.checkpoint"])["settings_key"]
            search.load_checkpoint(checkpoint, key)
    rc, err = invoke("train", *args, "--out", out)
    assert rc == 0, err
    assert np.array_equal(edge_ti.load_embedding(out)["<c>"],
                          edge_ti.load_embedding(str(tmp_path / "whole.safetensors"))["<c>"])
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
