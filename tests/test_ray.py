"""Ray Data (gamma.integrations.ray) on a local Ray with 2 CPU actors: the rows of `gamma score`, also after an actor
dies mid-run. Slow (Ray's start-up), kept to one Ray session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close, read_rows
from PIL import Image

from gamma.data.photos import distorted_photos

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["--model", "gamma_test", "--crops", "center", "--distribution"]
KWARGS = {"model": "gamma_test", "crops": "center", "distribution": True}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_photos")
    images, _ = distorted_photos(6, size=(64, 80), seed=5)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"p{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray session (2 CPUs) for the whole file: starting Ray costs seconds, each time."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def expected(photos, tmp_path_factory) -> list[list[str]]:
    """The rows of single-process `gamma score` (a subprocess, as a user runs it)."""
    out = tmp_path_factory.mktemp("ray_expected") / "one.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "gamma", "score", str(photos), *OPTIONS, "--out", str(out),
                        "--no-progress", "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "broken.png" in r.stderr, r.stderr
    return read_rows(out)


def test_map_batches_equals_gamma_score_and_survives_a_killed_actor(local_ray, photos, expected, tmp_path):
    from gamma.integrations.ray import GammaScorer

    paths = sorted(str(p) for p in photos.iterdir())
    kwargs = KWARGS

    def run(cls, marker: Path | None = None):
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=3)
        extra = {"marker": str(marker)} if marker else {}
        out = ds.map_batches(cls, fn_constructor_kwargs={**kwargs, **extra}, concurrency=2, batch_size=3,
                             batch_format="pandas", num_cpus=1, max_restarts=2, max_task_retries=2)
        return out.to_pandas()

    df = run(GammaScorer)
    assert list(df["name"]) == paths
    bad = df[df["name"].str.endswith("broken.png")]
    assert len(bad) == 1 and "broken.png" in bad["error"].iloc[0]
    good = df[df["error"].isna()]
    header = expected[0]
    assert list(good.columns) == [*header, "error"]
    assert list(good["name"]) == [row[0] for row in expected[1:]]
    # The CSV's values (6 decimals written); other batch sizes than the CSV's run may move the 7th decimal.
    assert_close(good[header[1:]].to_numpy(float), np.array([row[1:] for row in expected[1:]], float), rtol=0,
                 atol=2e-6)

    class Crashing(GammaScorer):
        """Dies (os._exit) in the first batch it gets while the marker file exists, deleting it: one crash."""

        def __init__(self, marker: str, **kw):
            super().__init__(**kw)
            self.marker = marker

        def __call__(self, batch):
            if os.path.exists(self.marker):
                os.unlink(self.marker)
                os._exit(1)
            return super().__call__(batch)

    marker = tmp_path / "crash-once"
    marker.write_text("x")
    again = run(Crashing, marker)
    assert not marker.exists()  # an actor did die
    assert list(again["name"]) == paths  # every row once, in order
    assert again[again["error"].isna()].drop(columns="error").equals(good.drop(columns="error"))


def test_pyarrow_batches_and_bytes_column(photos):
    """Called directly (no Ray needed): a pyarrow batch of bytes with names comes back typed, in order."""
    import pyarrow as pa

    from gamma.integrations.ray import GammaScorer

    scorer = GammaScorer(model="gamma_test", crops="center")
    files = sorted(photos.glob("p0*.png"))[:3]
    batch = pa.table({"name": [f.stem for f in files], "jpg": [f.read_bytes() for f in files]})
    out = scorer(batch)
    assert out.column("name").to_pylist() == [f.stem for f in files]
    assert str(out.schema.field("score").type) == "double" and out.column("error").null_count == 3
    with pytest.raises(ValueError, match="path column"):
        scorer(pa.table({"x": [1]}))


def test_cli_engine_ray(local_ray, photos, expected, tmp_path, capsys):
    """`gamma score --engine ray` (in this process: it uses the Ray session it finds) writes the single-process
    rows."""
    from gamma.cli import main

    status = main(["score", str(photos), *OPTIONS, "--engine", "ray", "--out", str(tmp_path / "ray.csv"),
                   "--batch-size", "3", "--no-progress"])
    assert status == 1 and "broken.png" in capsys.readouterr().err
    rows = read_rows(tmp_path / "ray.csv")
    assert rows[0] == expected[0] and [r[0] for r in rows] == [r[0] for r in expected]
    assert_close(np.array([r[1:] for r in rows[1:]], float), np.array([r[1:] for r in expected[1:]], float), rtol=0,
                 atol=2e-6)
