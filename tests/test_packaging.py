"""A wheel, installed without the repository, runs the Hydra app: the configs travel inside the package."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from helpers import REPO


def test_wheel_in_a_fresh_virtualenv_runs_the_hydra_app(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO), "-w", str(wheels)],
        check=True,
        capture_output=True,
    )
    wheel = next(wheels.glob("lit_embed-*.whl"))
    # The dependencies (torch, lightning, ...) come from this interpreter's site-packages; lit_embed from the wheel.
    env_dir = tmp_path / "env"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"  # not the repository: nothing can be read from its conf/
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import lit_embed.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(path.startswith(str(env_dir)) for path in where), where

    run = subprocess.run(
        [str(bin_dir / "lit-embed-train"), "model=tiny", "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "modules.json").is_file()
    assert '"step": 2' in (tmp_path / "run" / "metrics.json").read_text()
