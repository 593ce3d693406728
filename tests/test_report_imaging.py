"""The report's numpy/Pillow pictures equal the torch convention, and the report path imports no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_report_common import make_run

from cnncam.cam import viz
from cnncam.config import DataConfig
from cnncam.data import eval_transform
from cnncam.errors import CamError
from cnncam.report import imaging

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("src", "dst"), [((7, 7), (32, 32)), ((4, 6), (24, 20)), ((13, 9), (5, 4)), ((1, 1), (3, 3))]
)
def test_upsample_equals_torch_bilinear(src: tuple[int, int], dst: tuple[int, int]) -> None:
    maps = np.random.default_rng(0).normal(size=(3, 2, *src)).astype(np.float32)
    want = viz.upsample(torch.from_numpy(maps), dst).numpy()
    got = imaging.upsample(maps, dst)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_normalize_uint8_colormap_and_overlay_equal_torch() -> None:
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(4, 9, 9))
    maps[0] = 3.0  # constant map -> zeros in both
    np.testing.assert_allclose(
        imaging.normalize(maps), viz.normalize(torch.from_numpy(maps)).numpy(), atol=1e-12
    )
    m01 = rng.uniform(size=(5, 5)).astype(np.float32)
    assert np.array_equal(imaging.to_uint8(m01), viz.to_uint8(torch.from_numpy(m01)).numpy())
    np.testing.assert_array_equal(imaging.colormap_lut("viridis"), viz.colormap_lut("viridis").numpy())
    image = rng.uniform(size=(20, 20, 3)).astype(np.float32)
    want = viz.overlay(
        torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(m01)[None], 0.3, "jet"
    )
    got = imaging.overlay(image, m01, 0.3, "jet")
    np.testing.assert_allclose(got, want[0].permute(1, 2, 0).numpy(), atol=2e-6)
    with pytest.raises(CamError, match="unknown colormap 'nosuch'"):
        imaging.colormap_lut("nosuch")


@pytest.mark.parametrize(("w", "h", "resize", "size"), [(40, 28, 32, 24), (28, 40, 28, 28), (64, 64, 36, 32)])
def test_eval_geometry_places_pixels_like_torchvision(w: int, h: int, resize: int, size: int) -> None:
    """Same output size and crop; Pillow's bilinear stands in for torchvision's (values within 3 %)."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 4 + yy // 4) % 2) * 255], -1).astype(np.uint8)
    image = Image.fromarray(arr)
    data = dataclasses.replace(DataConfig(), image_size=size, resize=resize, normalize="none")
    want = eval_transform(data, (0.0,) * 3, (1.0,) * 3)(image).permute(1, 2, 0).numpy()
    got = imaging.eval_geometry(image, data)
    assert got.shape == want.shape == (size, size, 3)
    # The two smooth ramps encode position: a shifted crop would move them by whole pixels.
    np.testing.assert_allclose(got[..., :2], want[..., :2], atol=0.03)


def _run_python(code: str, *args: str) -> str:
    env = {"PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_report_imports_no_torch(tmp_path: Path) -> None:
    run = make_run(tmp_path, shards=2)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from cnncam.report import build_report\n"
        "index = build_report(Path(sys.argv[1]))\n"
        "print(index.is_file(), 'torch' in sys.modules, 'torchvision' in sys.modules)\n"
    )
    assert _run_python(code, str(run)).split() == ["True", "False", "False"]


def test_report_command_imports_no_torch(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    code = (
        "import sys\n"
        "from cnncam.cli import main\n"
        "rc = main(['report', '--run', sys.argv[1], '--executor', 'inline'])\n"
        "print('RESULT', rc, 'torch' in sys.modules)\n"
    )
    out = _run_python(code, str(run))
    assert "RESULT 0 False" in out, out
    assert (run / "report" / "index.html").is_file()
