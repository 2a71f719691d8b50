"""How well each feature map of a frozen CLIP image tower tells the shape in each cell of a generated scene.

A linear probe (logistic regression) per ``--stage`` (``itm_tokens.image_tokens``'s: 1 the last feature map, 2 the
one before): a scene cell's features are the tokens of its quarter of the map (one token of a 2 x 2 map, four of
a 4 x 4 one), trained on the train split's cells and measured on the test split's. A decoder that reads these
tokens cannot answer "what shape is ..." better than its tokens keep the shape: this says where that limit is.

    python scripts/probe_cell_shapes.py --set /tmp/scenes11 --clip data/models/scenes-clip [--train 1500]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipsearch.lab.image_token_cache import cache_image_tokens  # noqa: E402
from retrieval.model.device import CPU  # noqa: E402
from retrieval.model.encoder import Encoder  # noqa: E402
from retrieval.model.spec import ModelSpec  # noqa: E402


def quarter_features(grid: torch.Tensor) -> torch.Tensor:
    """(B, cells, C) tokens of a square map -> (B, 4, C * cells / 4): each scene cell's quarter, in reading order."""
    batch, cells, channels = grid.shape
    side = round(cells**0.5)
    half = side // 2
    square = grid.reshape(batch, 2, half, 2, half, channels)  # rows: (top/bottom, row in half), cols likewise
    return square.permute(0, 1, 3, 2, 4, 5).reshape(batch, 4, -1)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor):
    """Test accuracy of a standardised logistic regression (full batch Adam, 300 steps)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(linear(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((linear(test_x).argmax(1) == test_y).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="a scenes set folder (images/, dataset.json)")
    parser.add_argument("--clip", type=Path, default=ROOT / "data" / "models" / "scenes-clip")
    parser.add_argument("--train", type=int, default=1500, help="training scenes for the probe")
    parser.add_argument("--stage", type=int, action="append", help="feature maps to probe (default: 1 and 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = json.loads((args.set / "dataset.json").read_text())["images"]
    parts = {"train": [i for i in images if i["split"] == "train"][: args.train]}
    parts["test"] = [i for i in images if i["split"] == "test"]
    shapes = sorted({cell.split()[1] for image in images for cell in image["attributes"]["cells"]})
    encoder = Encoder.load(ModelSpec(f"local-dir:{args.clip}"), CPU)
    labels = {
        split: torch.tensor([[shapes.index(c.split()[1]) for c in i["attributes"]["cells"]] for i in part]).flatten()
        for split, part in parts.items()
    }
    for stage in args.stage or [1, 2]:
        features = {}
        for split, part in parts.items():
            paths = [args.set / "images" / image["filename"] for image in part]
            tokens = cache_image_tokens(encoder.model, encoder.preprocess, paths, stage=stage)
            features[split] = quarter_features(tokens.grid.float()).flatten(0, 1)
        accuracy = probe_accuracy(features["train"], labels["train"], features["test"], labels["test"])
        cells, channels = tokens.grid.shape[1:]
        print(
            f"stage {stage}: {cells} cells x {channels} channels; shape of a scene cell from its quarter: "
            f"{100 * accuracy:.1f}% of {len(labels['test'])} test cells"
        )


if __name__ == "__main__":
    main()
