"""Options shared by several commands, declared once (typer's declarations are data, not logic)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

IndexOption = Annotated[
    Path | None,
    typer.Option(
        "--index", envvar="CLIPSEARCH_INDEX", help="Index folder (default: XDG data dir).", show_default=False
    ),
]

BF16TextOption = Annotated[
    bool,
    typer.Option("--bf16-text", help="CPU: encode text queries with a bfloat16 text tower (about 2x faster)."),
]

ModelOption = Annotated[
    str, typer.Option("--model", help="open_clip model name, or local-dir:FOLDER with a saved model.")
]
PretrainedOption = Annotated[
    str, typer.Option("--pretrained", help="open_clip pretrained tag, or a checkpoint file path.")
]
KOption = Annotated[int, typer.Option("-k", "--top-k", help="How many results.")]
MinScoreOption = Annotated[float | None, typer.Option("--min-score", help="Drop results below this cosine score.")]
UnderOption = Annotated[Path | None, typer.Option("--under", help="Only results inside this folder.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print results as JSON.")]
PathsOption = Annotated[bool, typer.Option("--paths", help="Print one path per line (for piping).")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda (fp16 on CUDA).")]
IndexTypeOption = Annotated[
    str | None,
    typer.Option(
        "--index-type",
        help="Vector index: auto (exact flat up to 1M images, then ivf, then ivfpq to fit --max-memory), flat, "
        "ivf, ivfpq or hnsw. Kept for later runs; default: the index's own (new indexes: auto).",
        show_default=False,
    ),
]
MaxMemoryOption = Annotated[
    str | None,
    typer.Option(
        "--max-memory", help="Memory budget auto plans the vector index with, e.g. 4G (default: half the RAM)."
    ),
]
ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="CLIPSEARCH_SERVER",
        help="Ask a running `clipsearch serve` (e.g. http://127.0.0.1:8000) instead of loading the model.",
        show_default=False,
    ),
]
NoWaitOption = Annotated[bool, typer.Option("--no-wait", help="Fail instead of waiting for a running indexer.")]
BatchOption = Annotated[int, typer.Option("--batch-size", help="Images per encoder batch.")]
WorkersOption = Annotated[int | None, typer.Option("--workers", help="Decoding processes (default: cores).")]
