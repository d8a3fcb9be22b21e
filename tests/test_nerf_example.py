"""examples/render_scene.py runs end to end at a low resolution and writes a valid PNG of the scene."""

import importlib.util
import struct
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("render_scene", ROOT / "examples" / "render_scene.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_scene_writes_png(tmp_path):
    example = load_example()
    out = tmp_path / "scene.png"
    result = example.main(["--width", "24", "--height", "16", "--resolution", "16", "--out", str(out)])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (24, 16)
    # the IDAT decompresses to one filter byte + 3 bytes per pixel per row
    idat_len = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    assert len(zlib.decompress(data[41 : 41 + idat_len])) == 16 * (1 + 24 * 3)
    image = result["image"]
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    # the spheres are in view (not a blank background) and the grid is sparse
    assert (image < 0.9).any(-1).float().mean() > 0.05
    assert 0.0 < result["occupied"] < 0.5
