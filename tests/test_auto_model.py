"""``model.name=auto`` and ``image_size=auto`` for colour image folders: the rule measured in docs/benchmarks.md
("Colour image folders: which model for model.name=auto") -- the compact CNN at 32 px at most -- on shapes, and end
to end on a small generated colour folder."""

import json

import numpy as np
import pytest

from ccar.data import build_dataset
from ccar.data.folders import COLOUR_AUTO, ImageSurvey
from ccar.engine.config import load_config
from ccar.engine.build import auto_model
from ccar.engine.train import train


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCAR_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("side", [24, 32, 48, 64, 96, 128, 224])
def test_colour_images_get_the_compact_cnn_with_the_measured_reason(side):
    # ResNet-32 (with its stem from 96 px on) stayed near chance on every colour folder measured; the CNN did not
    name, why = auto_model((3, side, side))
    assert name == "cnn"
    assert why.startswith(f"{side} px colour images") and "per CPU-minute" in why and "docs/benchmarks.md" in why


def test_grey_and_tables_keep_their_rule():
    assert auto_model((1, 28, 28)) == ("cnn", "28 px images")  # grey: not what the colour folders measured
    assert auto_model((1, 96, 96))[0] == "resnet32"
    assert auto_model((12,)) == ("mlp", "12 features per row")


def test_image_size_auto_trains_large_colour_images_at_the_measured_size():
    assert COLOUR_AUTO == 32
    for sizes in ([(96, 96)] * 4, [(224, 224)] * 4, [(640, 480), (500, 375), (300, 400)]):
        size, why = ImageSurvey(sizes, grey=False).choose_size()
        assert size == 32 and "colour images train at 32 px" in why and "docs/benchmarks.md" in why
    assert ImageSurvey([(96, 96)] * 4, grey=True).choose_size() == (96, "the images share one size, 96x96")
    assert ImageSurvey([(32, 32)] * 4, grey=False).choose_size() == (32, "the images share one size, 32x32")
    assert ImageSurvey([(24, 28)] * 4, grey=False).choose_size()[0] == 24  # at most 32: kept


def write_colour_folder(root, size=72, per_class=(9, 5, 3), test=2):
    """Three classes of colour photos-to-be: a shape (bar, square, ring) in a random colour on a random background."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    masks = [np.abs(xx - 0.5) < 0.1, (np.abs(xx - 0.5) < 0.25) & (np.abs(yy - 0.5) < 0.25),
             np.abs(np.hypot(xx - 0.5, yy - 0.5) - 0.3) < 0.06]
    for c, n in enumerate(per_class):
        for split, m in (("train", n), ("test", test)):
            for i in range(m):
                img = np.ones((size, size, 3)) * rng.uniform(0, 1, 3) + rng.normal(0, 0.05, (size, size, 3))
                img[masks[c]] = rng.uniform(0, 1, 3)
                path = root / split / f"class{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return root


def test_a_colour_folder_run_trains_the_chosen_cnn_at_32_px_and_says_why(tmp_path):
    root = write_colour_folder(tmp_path / "photos")
    out, lines = tmp_path / "run", []
    cfg = load_config(None, ["dataset=folder", f"data_root={root}", "epochs=1", "val_fraction=0", f"out={out}",
                             "model.width=4", "optim.batch_size=8", "threads=1", "progress=false"])
    train(cfg, log=lines.append)
    text = "\n".join(lines)
    assert ("model.name=auto: cnn (32 px colour images: the compact CNN, the best balanced accuracy per CPU-minute "
            "on colour folders of 32-224 px (docs/benchmarks.md))") in text
    assert "images 32x32 (image_size=auto: the images share one size, 72x72; colour images train at 32 px" in text
    saved = load_config(str(out / "config.yaml"))
    assert saved.model.name == "cnn" and saved.image_size == "auto"  # the model itself is recorded, as before
    assert json.loads((out / "data.json").read_text())["input_shape"] == [3, 32, 32]
    # an explicit size still wins, and so does an explicit model
    assert build_dataset("folder", str(root), image_size=72, progress=False).input_shape == (3, 72, 72)
