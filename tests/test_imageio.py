"""The package's image readers (localize's read_image, evaluate-model's dataset, the PxAP masks) on
files they did not make: one clear error per bad file, never a traceback of Pillow's or a hang."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
import torch

from rethinkcam_fast.evaluation.masks import read_grayscale
from rethinkcam_fast.imageio import ImageReadError, read_image


def _png(path, width: int, height: int, chunks: list[tuple[bytes, bytes]]) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + header + b"".join(chunk(k, d) for k, d in chunks) + chunk(b"IEND", b""))
    return str(path)


def _bad_files(tmp_path) -> dict[str, tuple[str, str]]:
    """name: (path, what the error says)."""
    rows = zlib.compress(b"".join(b"\x00" + bytes(48) for _ in range(16)))
    files = {
        # a 68-byte file whose header claims 10^10 pixels: Pillow refuses it (nothing is allocated)
        "bomb": (_png(tmp_path / "bomb.png", 100000, 100000, [(b"IDAT", zlib.compress(b"\0" * 10))]),
                 "DecompressionBombError"),
        # a chunk with a corrupt name: Pillow raises SyntaxError
        "chunk": (_png(tmp_path / "chunk.png", 16, 16, [(b"IDAT", rows[:10]), (b"\x1e#,\x9d", rows[10:])]),
                  "SyntaxError: broken PNG file"),
        "text": (str(tmp_path / "text.png"), "UnidentifiedImageError"),
    }
    (tmp_path / "text.png").write_text("not an image")
    if hasattr(os, "mkfifo"):  # a named pipe (from an extracted archive): opening it would block
        os.mkfifo(tmp_path / "pipe.png")
        files["pipe"] = (str(tmp_path / "pipe.png"), "not a regular file")
    return files


def test_read_image_names_each_bad_file(tmp_path):
    for name, (path, reason) in _bad_files(tmp_path).items():
        with pytest.raises(ImageReadError, match=f"{path}: .*{reason}"):
            read_image(path)


def test_mask_reader_names_each_bad_file(tmp_path):
    for name, (path, reason) in _bad_files(tmp_path).items():
        error = FileNotFoundError if name == "pipe" else ValueError
        with pytest.raises(error, match=f"mask file .*{path}.*{reason}|mask file is {reason}: {path}"):
            read_grayscale(path)


def test_evaluate_model_dataset_names_each_bad_image(tmp_path):
    from rethinkcam_fast.evaluation import read_metadata
    from rethinkcam_fast.evaluation.model import WSOLImageDataset

    files = _bad_files(tmp_path)
    split = tmp_path / "meta"
    split.mkdir()
    names = [os.path.basename(path) for path, _ in files.values()]
    (split / "image_ids.txt").write_text("".join(f"{n}\n" for n in names))
    (split / "class_labels.txt").write_text("".join(f"{n},0\n" for n in names))
    (split / "image_sizes.txt").write_text("".join(f"{n},16,16\n" for n in names))
    (split / "localization.txt").write_text("".join(f"{n},1,1,5,5\n" for n in names))
    dataset = WSOLImageDataset(str(tmp_path), read_metadata(str(split)), 8)
    for index, (name, (path, reason)) in enumerate(files.items()):
        error = FileNotFoundError if name == "pipe" else ValueError
        with pytest.raises(error, match=f"image {names[index]!r} .*{reason}"):
            dataset[index]


def test_float_images_in_the_unit_range_are_scaled_not_blacked_out(tmp_path):
    from PIL import Image

    values = np.linspace(0.1, 0.93, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(values, mode="F").save(tmp_path / "unit.tif")
    grey = read_image(str(tmp_path / "unit.tif"), channels=1)[0]
    assert torch.equal(grey, torch.from_numpy(np.round(values.astype(np.float64) * 255).astype(np.uint8)))
    Image.fromarray(values * 200, mode="F").save(tmp_path / "wide.tif")  # beyond [0, 1]: 8-bit values as they are
    assert torch.equal(read_image(str(tmp_path / "wide.tif"), channels=1)[0],
                       torch.from_numpy(np.round(values.astype(np.float64) * 200).astype(np.uint8)))
