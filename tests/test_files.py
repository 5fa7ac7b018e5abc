"""Files lit_embed writes get the modes a plain open() / mkdir would give under the umask, never tempfile's 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import compose_train, tiny_run_overrides, write_toy_data
from safetensors.torch import save_file

from lit_embed import files
from lit_embed.files import link_atomic, open_atomic, write_directory_atomic, write_text_atomic
from lit_embed.train import run


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def expected(mask: int, directory: bool) -> int:
    return (0o777 if directory else 0o666) & ~mask


def test_the_umask_is_read_without_changing_it() -> None:
    with umask(0o027):
        assert files.umask() == 0o027
        assert os.umask(0o027) == 0o027, "reading it left it as it was"


def test_without_proc_the_umask_comes_from_one_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "_umask_from_proc", lambda: None)
    with umask(0o027):
        assert files._umask_by_setting() == 0o027 and os.umask(0o027) == 0o027
    monkeypatch.setattr(files, "_UMASK_AT_IMPORT", 0o007)
    assert files.umask() == 0o007 and files.plain_mode() == 0o660 and files.plain_mode(directory=True) == 0o770


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_atomic_writes_get_the_umask_modes(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        write_text_atomic(tmp_path / "metrics.json", "{}")
        with open_atomic(tmp_path / "step=1.ckpt", binary=True) as f:
            f.write(b"weights")
        link_atomic(tmp_path / "step=1.ckpt", tmp_path / "last.ckpt")

        def write(staging: Path) -> None:
            (staging / "1_Pooling").mkdir()
            (staging / "1_Pooling" / "config.json").write_text("{}")
            save_file({}, str(staging / "model.safetensors"))  # safetensors writes 0600 on its own
            (staging / "run.sh").write_text("#!/bin/sh\n")
            (staging / "run.sh").chmod(0o700)

        model = write_directory_atomic(tmp_path / "model", write)
    assert mode(tmp_path / "metrics.json") == expected(mask, directory=False)
    assert mode(tmp_path / "step=1.ckpt") == mode(tmp_path / "last.ckpt") == expected(mask, directory=False)
    assert mode(model) == mode(model / "1_Pooling") == expected(mask, directory=True)
    assert mode(model / "model.safetensors") == mode(model / "1_Pooling" / "config.json") == expected(mask, False)
    assert mode(model / "run.sh") == expected(mask, directory=True), "an executable stays executable"


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=oct)
def test_a_finished_run_is_as_readable_as_the_umask_says(tmp_path: Path, mask: int) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    with umask(mask):
        run(compose_train(tiny_run_overrides(train, val, out, **{"checkpoint.save_steps": 2})))
    model = out / "model"
    written = [model, *model.rglob("*"), out / "metrics.json", out / "report.html", out / "checkpoints"]
    written += list(out.glob("checkpoints/*"))
    assert model / "model.safetensors" in written and out / "checkpoints" / "last.ckpt" in written
    assert len(list(out.glob("checkpoints/step=*.ckpt"))) >= 2
    wrong = {str(p.relative_to(out)): oct(mode(p)) for p in written if mode(p) != expected(mask, p.is_dir())}
    assert not wrong, f"umask {mask:#o}: modes other than a plain open()/mkdir would give: {wrong}"
