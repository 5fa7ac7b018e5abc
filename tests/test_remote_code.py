"""A model directory that names code from outside sentence-transformers is refused unless trust_remote_code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from helpers import REPO, write_toy_data

from lit_embed import evaluate, mine
from lit_embed.errors import LitEmbedError
from lit_embed.models.adapted import AdaptedEncoder
from lit_embed.models.adapters import MLPAdapter
from lit_embed.models.encoder import Encoder
from lit_embed.models.model_folder import check_module_classes
from lit_embed.score import load_teacher

CUSTOM_POOLING = """
import pathlib
from sentence_transformers.sentence_transformer.modules import Pooling as _Pooling

pathlib.Path(__file__).with_name("IMPORTED").touch()  # proof that loading ran this file


class Pooling(_Pooling):
    pass
"""


def custom_model(tiny_model_path: str, directory: Path, module_type: str) -> Path:
    """A copy of the tiny model whose pooling module is ``module_type``."""
    model = directory / "model"
    shutil.copytree(tiny_model_path, model)
    modules = json.loads((model / "modules.json").read_text())
    modules[1]["type"] = module_type
    (model / "modules.json").write_text(json.dumps(modules))
    return model


@pytest.fixture()
def my_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed package ``my_pkg`` with a custom pooling class whose import leaves a file behind."""
    package = tmp_path / "site" / "my_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "custom.py").write_text(CUSTOM_POOLING)
    monkeypatch.syspath_prepend(str(package.parent))
    yield package
    sys.modules.pop("my_pkg.custom", None)
    sys.modules.pop("my_pkg", None)


def test_a_package_class_is_refused_before_it_is_imported(tmp_path: Path, tiny_model_path: str, my_pkg: Path) -> None:
    model = custom_model(tiny_model_path, tmp_path, "my_pkg.custom.Pooling")
    with pytest.raises(LitEmbedError) as err:
        Encoder(model)
    message = str(err.value)
    assert str(model / "modules.json") in message and "'my_pkg.custom.Pooling'" in message
    assert "model.trust_remote_code=true" in message
    assert not (my_pkg / "IMPORTED").exists(), "the class's code never ran"


def test_trust_remote_code_loads_the_custom_class(tmp_path: Path, tiny_model_path: str, my_pkg: Path) -> None:
    model = custom_model(tiny_model_path, tmp_path, "my_pkg.custom.Pooling")
    encoder = Encoder(model, trust_remote_code=True)
    assert type(encoder.model[1]).__module__ == "my_pkg.custom" and (my_pkg / "IMPORTED").exists()
    assert encoder.encode(["how do I parse json?"], "query").shape == (1, encoder.embedding_dim)


def test_a_class_from_the_model_directory_is_refused(tmp_path: Path, tiny_model_path: str) -> None:
    model = custom_model(tiny_model_path, tmp_path, "modeling_custom.Pooling")
    (model / "modeling_custom.py").write_text(CUSTOM_POOLING)
    with pytest.raises(LitEmbedError, match=r"names the module class 'modeling_custom.Pooling'"):
        Encoder(model)
    assert not (model / "IMPORTED").exists()


def test_what_sentence_transformers_writes_is_trusted(tmp_path: Path, tiny_model_path: str) -> None:
    """Legacy and current sentence_transformers names, a Router, Dense layers with torch.nn activations."""
    adapted = AdaptedEncoder(Encoder(tiny_model_path), partial(MLPAdapter), cache_dir=None)
    adapted.save(tmp_path / "adapted")
    router = json.loads((tmp_path / "adapted" / "3_Router" / "router_config.json").read_text())
    assert router["types"] and all(t.endswith(".Dense") for t in router["types"].values())
    check_module_classes(tmp_path / "adapted")
    Encoder(tmp_path / "adapted")
    legacy = custom_model(tiny_model_path, tmp_path / "legacy", "sentence_transformers.models.Pooling")
    Encoder(legacy)


@pytest.mark.parametrize("activation", ["os.system", "torch.nn.functional.relu", "my_pkg.custom.Pooling"])
def test_a_dense_activation_outside_torch_nn_is_refused(tmp_path: Path, tiny_model_path: str, activation: str) -> None:
    adapted = AdaptedEncoder(Encoder(tiny_model_path), partial(MLPAdapter), cache_dir=None)
    adapted.save(tmp_path / "adapted")
    config_file = tmp_path / "adapted" / "3_Router" / "query_0_Dense" / "config.json"
    config = json.loads(config_file.read_text())
    config["activation_function"] = activation
    config_file.write_text(json.dumps(config))
    with pytest.raises(LitEmbedError) as err:
        Encoder(tmp_path / "adapted")
    assert str(config_file) in str(err.value) and f"activation function {activation!r}" in str(err.value)


def test_a_router_module_outside_sentence_transformers_is_refused(tmp_path: Path, tiny_model_path: str) -> None:
    adapted = AdaptedEncoder(Encoder(tiny_model_path), partial(MLPAdapter), cache_dir=None)
    adapted.save(tmp_path / "adapted")
    config_file = tmp_path / "adapted" / "3_Router" / "router_config.json"
    config = json.loads(config_file.read_text())
    config["types"]["query_0_Dense"] = "my_pkg.custom.Dense"
    config_file.write_text(json.dumps(config))
    with pytest.raises(LitEmbedError, match=r"router_config.json names the module class 'my_pkg.custom.Dense'"):
        Encoder(tmp_path / "adapted")


def test_a_broken_modules_json_is_one_message(tmp_path: Path, tiny_model_path: str) -> None:
    model = custom_model(tiny_model_path, tmp_path, "sentence_transformers.models.Pooling")
    (model / "modules.json").write_text('{"type": "my_pkg.custom.Pooling"}')
    with pytest.raises(LitEmbedError, match="is not a sentence-transformers module list"):
        Encoder(model)
    (model / "modules.json").write_text("[{")
    with pytest.raises(LitEmbedError, match="could not be read as JSON"):
        Encoder(model)


def test_a_hugging_face_custom_model_is_one_message(tmp_path: Path, tiny_model_path: str) -> None:
    """Custom code that only transformers sees (config.json's auto_map) ends in our message too."""
    model = custom_model(tiny_model_path, tmp_path, "sentence_transformers.models.Pooling")
    config = json.loads((model / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    config.update(model_type="custombert", auto_map=auto_map)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(LitEmbedError, match=r"custom code.*set model.trust_remote_code=true"):
        Encoder(model)


def test_an_auto_map_for_a_model_type_transformers_knows_runs_no_code(tmp_path: Path, tiny_model_path: str) -> None:
    """As transformers without trust_remote_code: its own class for the model_type, not the folder's file."""
    model = custom_model(tiny_model_path, tmp_path, "sentence_transformers.models.Pooling")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text(CUSTOM_POOLING)
    encoder = Encoder(model)
    assert type(encoder.model[0].auto_model).__name__ == "BertModel" and not (model / "IMPORTED").exists()


def test_trust_remote_code_must_be_a_bool(tiny_model_path: str) -> None:
    with pytest.raises(LitEmbedError, match="trust_remote_code='yes' is not allowed"):
        Encoder(tiny_model_path, trust_remote_code="yes")


def test_eval_and_mine_name_their_flag(
    tmp_path: Path,
    tiny_model_path: str,
    my_pkg: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = custom_model(tiny_model_path, tmp_path, "my_pkg.custom.Pooling")
    _, val = write_toy_data(tmp_path, num_train=4, num_val=6)
    for main, args in (
        (evaluate.main, [str(model), str(val), "--device=cpu"]),
        (mine.main, [str(val), str(tmp_path / "mined.jsonl"), f"--model={model}"]),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err + caplog.text  # lit-embed-mine logs its message
        caplog.clear()
        assert "'my_pkg.custom.Pooling'" in err and "pass --trust-remote-code" in err and "Traceback" not in err
    assert not (my_pkg / "IMPORTED").exists()
    evaluate.main([str(model), str(val), "--device=cpu", "--json", "--trust-remote-code"])
    assert "mrr@10" in json.loads(capsys.readouterr().out)
    mine.main([str(val), str(tmp_path / "mined.jsonl"), f"--model={model}", "--trust-remote-code"])
    assert (tmp_path / "mined.jsonl").is_file()


def test_a_teacher_is_checked_as_every_model(tmp_path: Path, tiny_model_path: str, my_pkg: Path) -> None:
    """lit-embed-score and lit-embed-mine --teacher load it themselves (a CrossEncoder or a bi-encoder)."""
    model = custom_model(tiny_model_path, tmp_path, "my_pkg.custom.Pooling")
    with pytest.raises(
        LitEmbedError, match=r"names the module class 'my_pkg.custom.Pooling'.*pass --trust-remote-code"
    ):
        load_teacher(str(model))
    assert not (my_pkg / "IMPORTED").exists()
    scores = load_teacher(str(model), trust_remote_code=True)([("how do I parse json?", "json.loads(text)")])
    assert len(scores) == 1 and (my_pkg / "IMPORTED").exists()


@pytest.mark.slow
def test_train_py_refuses_it_with_one_message(tmp_path: Path, tiny_model_path: str) -> None:
    model = custom_model(tiny_model_path, tmp_path, "my_pkg.custom.Pooling")
    train, val = write_toy_data(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "model=tiny",
            f"model.model_name_or_path={model}",
            "data=qa_json",
            f"data.train_path={train}",
            f"data.val_path={val}",
            f"output_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert f"{model / 'modules.json'} names the module class 'my_pkg.custom.Pooling'" in output
    assert "model.trust_remote_code=true" in output
