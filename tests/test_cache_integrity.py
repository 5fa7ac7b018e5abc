"""Every cache lit_embed keeps is checked whole before use: one cut short, with files deleted or overwritten, is built
again with one warning naming it, and gives what a fresh build gives; an intact one is reused as it is. Rows and token
stores, embedding files (adapters, GIST's guide, data.mine), the --index database, lit-embed-score's progress file;
what is not the cache's (a user's files beside an --index database) is never deleted."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_toy_data

from lit_embed import score as score_module
from lit_embed.data import store as store_module
from lit_embed.data.formats import training_rows
from lit_embed.data.ragged import Ragged
from lit_embed.data.tokens import tokenize_texts
from lit_embed.errors import LitEmbedError
from lit_embed.evaluate import evaluate
from lit_embed.evaluate import main as eval_main
from lit_embed.evaluation import vector_index
from lit_embed.models import embedding_cache
from lit_embed.models.embedding_cache import cache_path, cached_embeddings
from lit_embed.models.encoder import Encoder
from lit_embed.score import score_file


def write_jsonl(path: Path, n: int = 60) -> Path:
    rows = [
        {"query": f"question {i}?", "positive": f"passage {i} " + "word " * (i % 7), "negatives": [f"other {i % 5}"]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cut_short(file: str) -> Callable[[Path], str]:
    def damage(store: Path) -> str:
        size = (store / file).stat().st_size
        with open(store / file, "r+b") as f:
            f.truncate(size // 2)
        return f"{file} is {size // 2:,} bytes, expected {size:,}"

    return damage


def deleted(file: str) -> Callable[[Path], str]:
    def damage(store: Path) -> str:
        (store / file).unlink()
        return f"{file} is missing"

    return damage


def overwritten(file: str) -> Callable[[Path], str]:
    """Garbage of the same size: only the checksum tells."""

    def damage(store: Path) -> str:
        (store / file).write_bytes(b"{" * (store / file).stat().st_size)
        return f"{file} does not match its SHA-256"

    return damage


def every_file_deleted(store: Path) -> str:
    """What temp cleaners do: the files go, the folder stays."""
    for file in store.iterdir():
        file.unlink()
    return "no manifest.json"


def manifest_deleted(store: Path) -> str:
    """A store from before manifests looks the same."""
    (store / "manifest.json").unlink()
    return "no manifest.json"


def garbage_manifest(store: Path) -> str:
    (store / "manifest.json").write_text("{not json")
    return "manifest.json is not the manifest lit_embed writes"


ROWS_DAMAGE = {
    "cut short": cut_short("documents.values.npy"),
    "rows.json deleted": deleted("rows.json"),
    "rows.json overwritten": overwritten("rows.json"),
    "manifest deleted": manifest_deleted,
    "manifest not JSON": garbage_manifest,
    "every file deleted": every_file_deleted,
}
TOKENS_DAMAGE = {
    "cut short": cut_short("input_ids.values.npy"),  # was `ValueError: mmap length is greater than file size`
    "meta.json deleted": deleted("meta.json"),
    "meta.json overwritten": overwritten("meta.json"),
    "manifest deleted": manifest_deleted,
    "manifest not JSON": garbage_manifest,
    "every file deleted": every_file_deleted,
}


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == store_module.__name__ and r.levelno >= logging.WARNING]


def builds(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage().startswith("Building") for r in caplog.records if r.name == store_module.__name__)


@pytest.mark.parametrize("damage", ROWS_DAMAGE.values(), ids=ROWS_DAMAGE.keys())
def test_a_damaged_rows_store_is_rebuilt_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], str]
) -> None:
    data, cache = write_jsonl(tmp_path / "train.jsonl"), tmp_path / "cache"
    fresh = training_rows(data, cache_dir=tmp_path / "fresh").examples()
    training_rows(data, cache_dir=cache)
    (store,) = cache.glob("rows-*")
    expected = damage(store)
    with caplog.at_level(logging.INFO, logger=store_module.__name__):
        rows = training_rows(data, cache_dir=cache)
    (warning,) = store_warnings(caplog)
    assert str(store) in warning and expected in warning, warning
    assert builds(caplog) == 1
    assert rows.examples() == fresh
    assert store_module.damage(store) is None


@pytest.mark.parametrize("damage", TOKENS_DAMAGE.values(), ids=TOKENS_DAMAGE.keys())
def test_a_damaged_token_store_is_rebuilt_with_one_warning(
    tmp_path: Path, tiny_encoder, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], str]
) -> None:
    texts = Ragged.from_texts([f"text number {i} " + "word " * (i % 11) for i in range(40)])
    fresh = tokenize_texts(texts, "document", tiny_encoder, "key", tmp_path / "fresh").packed(range(40))
    cache = tmp_path / "cache"
    tokenize_texts(texts, "document", tiny_encoder, "key", cache)
    (store,) = cache.glob("tokens-document-*")
    expected = damage(store)
    with caplog.at_level(logging.INFO, logger=store_module.__name__):
        tokens = tokenize_texts(texts, "document", tiny_encoder, "key", cache)
    (warning,) = store_warnings(caplog)
    assert str(store) in warning and expected in warning, warning
    assert builds(caplog) == 1
    got = tokens.packed(range(40))
    assert torch.equal(got.input_ids, fresh.input_ids) and got.lengths == fresh.lengths
    assert got.extras == fresh.extras and got.token_features.keys() == fresh.token_features.keys()


def test_an_intact_store_is_reused_without_building_or_writing(tmp_path: Path, caplog) -> None:
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        np.save(directory / "values.npy", np.arange(1000))
        (directory / "meta.json").write_text("{}")

    first = store_module.built_once(tmp_path, "store", build, "the store")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    with caplog.at_level(logging.INFO, logger=store_module.__name__):
        again = store_module.built_once(tmp_path, "store", build, "the store")
    assert again == first and len(calls) == 1
    assert not store_warnings(caplog) and builds(caplog) == 0
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamps
    manifest = json.loads((first / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["meta.json", "values.npy"]
    assert manifest["files"]["values.npy"]["bytes"] == (first / "values.npy").stat().st_size


def test_two_threads_rebuild_a_damaged_store_once(tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both see the damage before either takes the lock; the one that waited finds the store rebuilt, and keeps it."""
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        np.save(directory / "values.npy", np.arange(1000))

    store = store_module.built_once(tmp_path, "store", build, "the store")
    cut_short("values.npy")(store)
    calls.clear()
    both_checked = threading.Barrier(2, timeout=10)
    checked = threading.local()
    check = store_module.damage

    def damage_then_wait(directory: Path) -> str | None:
        found = check(directory)
        if not getattr(checked, "once", False):  # each thread's first check, outside the lock
            checked.once = True
            both_checked.wait()
        return found

    monkeypatch.setattr(store_module, "damage", damage_then_wait)
    opened = []

    def open_store() -> None:
        opened.append(store_module.built_once(tmp_path, "store", build, "the store"))

    with caplog.at_level(logging.INFO, logger=store_module.__name__):
        threads = [threading.Thread(target=open_store) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert opened == [store, store] and len(calls) == 1
    assert len(store_warnings(caplog)) == 1
    assert check(store) is None


def test_without_cross_node_locks_rank_zero_builds_and_the_other_ranks_wait_for_the_whole_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.cache_lock=rank0, on a file system that cannot lock: one build, by rank 0, opened by a rank that asked
    first; data.cache_lock=file there says what to set; a rank left waiting says why after its deadline."""

    def no_locks(*_: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store_module.fcntl, "flock", no_locks)
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        time.sleep(0.5)  # the other rank polls meanwhile
        np.save(directory / "values.npy", np.arange(1000))

    with pytest.raises(LitEmbedError, match=r"cannot lock files .*Set data.cache_lock=rank0"):
        store_module.built_once(tmp_path, "store", build, "the store", lock="file")
    assert not calls

    rank = threading.local()
    monkeypatch.setattr(store_module, "is_launching_process", lambda: getattr(rank, "zero", False))
    opened = []
    waiter = threading.Thread(
        target=lambda: opened.append(store_module.built_once(tmp_path, "store", build, "x", "rank0"))
    )
    waiter.start()  # rank 1, before rank 0 has begun
    time.sleep(0.2)
    rank.zero = True
    built = store_module.built_once(tmp_path, "store", build, "the store", lock="rank0")
    waiter.join(timeout=30)
    assert opened == [built] and len(calls) == 1 and store_module.damage(built) is None

    monkeypatch.setattr(store_module, "RANK0_WAIT_S", 0.3)
    rank.zero = False
    with pytest.raises(LitEmbedError, match=r"waited 0 min for rank 0 to build x in .*use data.cache_lock=file"):
        store_module.built_once(tmp_path, "never-built", build, "x", lock="rank0")


TEXTS = [f"text number {i}: " + "word " * (i % 5) for i in range(12)]


def cut_file_short(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "torch.load fails"


def bytes_changed_inside(path: Path) -> str:
    """The zip holds no checksum of its own: torch.load reads the changed floats without a word."""
    data = bytearray(path.read_bytes())
    start = data.find(torch.load(path, weights_only=True)["embeddings"].numpy().tobytes()[:64])
    assert start > 0
    data[start + 8 : start + 16] = b"\x00" * 8
    path.write_bytes(bytes(data))
    return "do not match their SHA-256"


def garbage_file(path: Path) -> str:
    path.write_bytes(b"garbage" * 100)
    return "torch.load fails"


def other_rows(path: Path) -> str:
    embeddings = torch.randn(3, 8)
    torch.save({"embeddings": embeddings, "sha256": embedding_cache._sha256(embeddings)}, path)
    return "holds 3 embeddings for 12 texts"


def not_a_tensor(path: Path) -> str:
    torch.save({"vectors": [1.0, 2.0]}, path)
    return "does not hold a [texts, dimensions] tensor"


EMBEDDING_DAMAGE = {
    "cut short": cut_file_short,
    "bytes changed inside": bytes_changed_inside,
    "garbage": garbage_file,
    "other rows": other_rows,
    "not a tensor": not_a_tensor,
}


@pytest.fixture()
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many texts each call of Encoder.encode embedded."""
    calls: list[int] = []
    encode = Encoder.encode

    def counted(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", counted)
    return calls


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == embedding_cache.__name__]


@pytest.mark.parametrize("damage", EMBEDDING_DAMAGE.values(), ids=EMBEDDING_DAMAGE.keys())
def test_a_damaged_embedding_file_is_embedded_again_with_one_warning(
    tmp_path: Path, tiny_encoder, encodes: list[int], caplog, damage: Callable[[Path], str]
) -> None:
    """Adapter training, GIST's guide and data.mine all read their embeddings through cached_embeddings."""
    first = cached_embeddings(tiny_encoder, TEXTS, "query", 4, tmp_path)
    path = cache_path(tiny_encoder, TEXTS, "query", tmp_path)
    expected = damage(path)
    encodes.clear()
    with caplog.at_level(logging.INFO, logger=embedding_cache.__name__):
        again = cached_embeddings(tiny_encoder, TEXTS, "query", 4, tmp_path)
    (warning,) = cache_warnings(caplog)
    assert str(path) in warning and expected in warning, warning
    assert encodes == [len(TEXTS)]
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    # Rewritten whole: the next run reads it without embedding or warning.
    caplog.clear()
    torch.testing.assert_close(cached_embeddings(tiny_encoder, TEXTS, "query", 4, tmp_path), first, atol=0, rtol=0)
    assert encodes == [len(TEXTS)] and not cache_warnings(caplog)


def test_an_intact_embedding_file_is_read_and_a_deleted_one_embedded_again(
    tmp_path: Path, tiny_encoder, encodes: list[int], caplog
) -> None:
    first = cached_embeddings(tiny_encoder, TEXTS, "document", 4, tmp_path)
    path = cache_path(tiny_encoder, TEXTS, "document", tmp_path)
    stamp = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger=embedding_cache.__name__):
        torch.testing.assert_close(cached_embeddings(tiny_encoder, TEXTS, "document", 4, tmp_path), first)
        assert encodes == [len(TEXTS)] and path.stat().st_mtime_ns == stamp
        path.unlink()  # nothing to warn about: as on a first run
        torch.testing.assert_close(cached_embeddings(tiny_encoder, TEXTS, "document", 4, tmp_path), first)
    assert encodes == [len(TEXTS)] * 2 and not cache_warnings(caplog)


def test_an_embedding_file_without_a_checksum_is_embedded_again(
    tmp_path: Path, tiny_encoder, encodes: list[int], caplog
) -> None:
    """A plain tensor (what a file without its checksum holds) proves nothing about its bytes: embedded again."""
    path = cache_path(tiny_encoder, TEXTS, "query", tmp_path)
    torch.save(torch.randn(len(TEXTS), tiny_encoder.embedding_dim), path)
    with caplog.at_level(logging.INFO, logger=embedding_cache.__name__):
        cached_embeddings(tiny_encoder, TEXTS, "query", 4, tmp_path)
    assert encodes == [len(TEXTS)] and "with its checksum" in cache_warnings(caplog)[0]
    saved = torch.load(path, weights_only=True)
    assert saved["sha256"] == embedding_cache._sha256(saved["embeddings"])


def cut_in_half(file: str, expected: str) -> Callable[[Path], str]:
    def damage(index: Path) -> str:
        cut_file_short(index / file)
        return expected

    return damage


def removed(file: str, expected: str) -> Callable[[Path], str]:
    def damage(index: Path) -> str:
        (index / file).unlink()
        return expected

    return damage


def index_json_not_json(index: Path) -> str:
    (index / "index.json").write_text('{"collection": "va')
    return "index.json is not JSON"


INCOMPLETE = "the collection 'val' that index.json describes is missing or incomplete"
INDEX_DAMAGE = {
    "meta.json cut short": cut_in_half("meta.json", "Qdrant cannot read its files (JSONDecodeError"),
    "points cut short": cut_in_half("collection/val/storage.sqlite", "Qdrant cannot read its files (DatabaseError"),
    "points deleted": removed("collection/val/storage.sqlite", INCOMPLETE),
    "meta.json deleted": removed("meta.json", INCOMPLETE),
    "index.json not JSON": index_json_not_json,
}


@pytest.fixture()
def index_setup(tmp_path: Path, tiny_model_path: str) -> tuple[str, Path, Path]:
    pytest.importorskip("qdrant_client", reason="pip install 'lit_embed[clients]'")
    _, val = write_toy_data(tmp_path, num_train=4, num_val=30)
    return tiny_model_path, val, tmp_path / "index"


def index_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == vector_index.__name__]


@pytest.mark.parametrize("damage", INDEX_DAMAGE.values(), ids=INDEX_DAMAGE.keys())
def test_a_damaged_index_is_rebuilt_with_one_warning(
    index_setup, caplog, capsys, damage: Callable[[Path], str]
) -> None:
    model, val, index = index_setup
    first = evaluate(model, val, device="cpu", index=index)
    expected = damage(index)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger=vector_index.__name__):
        again = evaluate(model, val, device="cpu", index=index)
    (warning,) = index_warnings(caplog)
    assert str(index) in warning and expected in warning, warning
    assert again == first and "Built the index" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=vector_index.__name__):
        assert evaluate(model, val, device="cpu", index=index) == first
    assert "Reusing the index" in capsys.readouterr().err and not index_warnings(caplog)


def test_an_interrupted_index_build_is_rebuilt_with_one_warning(
    index_setup, caplog, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, val, index = index_setup

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vector_index, "encode_texts", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, val, device="cpu", index=index)
    monkeypatch.undo()
    assert "fingerprint" not in json.loads((index / "index.json").read_text())  # what proves it did not finish
    with caplog.at_level(logging.INFO, logger=vector_index.__name__):
        rebuilt = evaluate(model, val, device="cpu", index=index)
    (warning,) = index_warnings(caplog)
    assert str(index) in warning and "its build did not finish" in warning
    exact = evaluate(model, val, device="cpu")
    assert all(abs(rebuilt[key] - value) <= 1e-6 for key, value in exact.items())


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_a_collection_rebuilt_through_qdrant_leaves_the_users_files_alone(index_setup, caplog) -> None:
    model, val, index = index_setup
    first = evaluate(model, val, device="cpu", index=index)
    (index / "notes.txt").write_text("the user's own")
    (index / "collection" / "val" / "storage.sqlite").unlink()
    with caplog.at_level(logging.INFO, logger=vector_index.__name__):
        assert evaluate(model, val, device="cpu", index=index) == first
    assert len(index_warnings(caplog)) == 1
    assert (index / "notes.txt").read_text() == "the user's own"


def test_a_damaged_index_beside_the_users_files_is_refused_and_nothing_is_deleted(index_setup, capsys) -> None:
    model, val, index = index_setup
    evaluate(model, val, device="cpu", index=index)
    (index / "notes.txt").write_text("the user's own")
    cut_file_short(index / "meta.json")
    before = tree(index)
    for rebuild in ([], ["--rebuild-index"]):
        with pytest.raises(SystemExit) as exit_info:
            eval_main([model, str(val), "--index", str(index), "--device", "cpu", *rebuild])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("lit-embed-eval: error:") == 1 and "Traceback" not in err
        assert f"--index {index}: Qdrant cannot read its files" in err
        assert "notes.txt" in err and "Move them out of it, or choose another --index folder" in err
        assert tree(index) == before


def another_tools_database(index: Path) -> None:
    """A Qdrant database lit_embed did not build: no index.json."""
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(index))
    client.create_collection("theirs", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    client.upsert("theirs", points=models.Batch(ids=[0], vectors=[[1.0, 0.0, 0.0, 0.0]], payloads=[{}]))
    client.close()


def test_a_damaged_database_without_index_json_is_refused_until_rebuild_index(index_setup, capsys, caplog) -> None:
    model, val, index = index_setup
    another_tools_database(index)
    cut_file_short(index / "meta.json")
    before = tree(index)
    with pytest.raises(LitEmbedError, match=r"and no index\.json says lit-embed-eval built it\. Pass --rebuild-index"):
        evaluate(model, val, device="cpu", index=index)
    assert tree(index) == before
    # Asked to, it replaces a database that holds nothing but Qdrant's files and the collection it builds.
    shutil.move(index / "collection" / "theirs", index / "collection" / "val")
    with caplog.at_level(logging.INFO, logger=vector_index.__name__):
        rebuilt = evaluate(model, val, device="cpu", index=index, rebuild_index=True)
    assert len(index_warnings(caplog)) == 1
    assert rebuilt == evaluate(model, val, device="cpu", index=index)


def test_an_unreadable_index_json_beside_another_collection_is_refused(index_setup) -> None:
    model, val, index = index_setup
    another_tools_database(index)
    (index / "index.json").write_text("not json")
    before = tree(index)
    with pytest.raises(LitEmbedError, match=r"index\.json is not JSON, and the folder holds .*\(collection/theirs\)"):
        evaluate(model, val, device="cpu", index=index)
    assert tree(index) == before


def test_a_torn_or_damaged_score_progress_line_is_scored_again_with_one_warning(tmp_path: Path, caplog) -> None:
    """lit-embed-score's progress file: a crash mid-write leaves a torn last line, which must not swallow the next
    record appended to it."""
    rows = [{"query": f"query {i}", "positive": f"doc {i}", "negatives": [f"neg {i}"]} for i in range(6)]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored: list[str] = []

    def teacher(pairs: list[tuple[str, str]]) -> list[float]:
        scored.extend(query for query, _ in pairs[::2])
        return [float(len(query) * 10 + len(doc)) for query, doc in pairs]

    def stop_after_three(pairs: list[tuple[str, str]]) -> list[float]:
        if len(scored) >= 3:
            raise KeyboardInterrupt
        return teacher(pairs)

    with pytest.raises(KeyboardInterrupt):
        score_file(source, out, stop_after_three, batch_size=2)
    progress = Path(f"{out}.progress")
    lines = progress.read_text().splitlines()
    assert len(lines) == 3
    progress.write_text(f"{lines[0]}\nnot a record\n{lines[2]}\n{lines[1][:20]}")  # damaged, and torn at the end
    scored.clear()
    with caplog.at_level(logging.INFO, logger=score_module.__name__), pytest.raises(KeyboardInterrupt):
        score_file(source, out, stop_after_three, batch_size=2)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(progress) in warning and "2 line(s) not whole records" in warning
    assert scored == ["query 1", "query 3", "query 4"]  # query 1's record was the torn one
    assert json.loads(progress.read_text().splitlines()[-1])["scores"]  # on a line of its own, not after the torn one
    scored.clear()
    score_file(source, out, teacher, batch_size=2)
    assert scored == ["query 5"]
    fresh = tmp_path / "fresh.jsonl"
    score_file(source, fresh, teacher, batch_size=2)
    assert out.read_text() == fresh.read_text()
