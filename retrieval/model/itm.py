"""A fusion image-text matching (ITM) model in the style of ALBEF/BLIP, read on top of a frozen CLIP.

A dual encoder compares one image vector with one text vector, so it cannot check *which* colour belongs to
*which* shape. Here text tokens cross-attend to the image tower's grid tokens in a few transformer layers, and
a two-way head on the first text token says whether the pair matches. It is far too slow to score a whole
collection, so it re-ranks the dual encoder's top N (``retrieval.search.rerank``). It lives beside the CLIP
model, not in ``lab``, because search loads it; training and evaluation are in ``clipsearch.lab.itm_*``.

A model folder holds ``itm_config.json`` (sizes, and the identity key of the CLIP model whose tokens it reads)
and ``itm_model.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import ModelLoadError

ITM_CONFIG_FILE = "itm_config.json"
ITM_WEIGHTS_FILE = "itm_model.safetensors"
ITM_VERDICT_FILE = "itm_verdict.json"  # validation recall@1 of the kept weights next to the dual encoder's


@dataclass(frozen=True)
class ItmConfig:
    """Sizes of the fusion model, and the CLIP model it was trained on (tokens of another CLIP mean nothing)."""

    image_cells: int
    image_channels: int
    image_embed: int
    text_width: int
    clip_key: str
    clip_model: str = ""
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2


class FusionLayer(nn.Module):
    """Pre-norm block: text self-attention, text→image cross-attention, MLP (ALBEF's fusion layer)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_cross = nn.LayerNorm(width)
        self.ln_image = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width * mlp_ratio), nn.GELU(), nn.Linear(width * mlp_ratio, width))

    def forward(
        self, text: torch.Tensor, text_pad: torch.Tensor, image: torch.Tensor, causal: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``causal``: an (L, L) mask that hides later tokens (the captioning decoder's self-attention), or None."""
        x = self.ln_self(text)
        text = text + self.self_attn(x, x, x, key_padding_mask=text_pad, attn_mask=causal, need_weights=False)[0]
        x, kv = self.ln_cross(text), self.ln_image(image)
        text = text + self.cross_attn(x, kv, kv, need_weights=False)[0]
        return text + self.mlp(self.ln_mlp(text))


class FusionItm(nn.Module):
    """Logits (no match, match) for image/text token pairs; the head reads the first text token.

    Image tokens are normalised before their projection and get a position embedding of the same scale: with
    a small one (ViT's 0.02) the cell a token comes from was lost in the feature's magnitude, and the model
    learned which colour goes with which shape but not where ("above" vs "below" stayed at chance)."""

    def __init__(self, config: ItmConfig):
        super().__init__()
        width = config.width
        self.config = config
        self.ln_grid = nn.LayerNorm(config.image_channels)
        self.ln_pooled = nn.LayerNorm(config.image_embed)
        self.image_proj = nn.Linear(config.image_channels, width)
        self.pooled_proj = nn.Linear(config.image_embed, width)
        self.image_position = nn.Parameter(torch.randn(config.image_cells + 1, width) * 0.5)
        self.text_proj = nn.Linear(config.text_width, width)
        self.layers = nn.ModuleList(FusionLayer(width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)

    def forward(
        self, grid: torch.Tensor, pooled: torch.Tensor, text_states: torch.Tensor, text_pad: torch.Tensor
    ) -> torch.Tensor:
        """``grid`` (B, cells, C), ``pooled`` (B, E), ``text_states`` (B, L, W), ``text_pad`` (B, L) → (B, 2)."""
        image = torch.cat(
            [self.pooled_proj(self.ln_pooled(pooled))[:, None], self.image_proj(self.ln_grid(grid))], dim=1
        )
        image = image + self.image_position
        text = self.text_proj(text_states)
        for layer in self.layers:
            text = layer(text, text_pad, image)
        return self.head(self.ln_final(text[:, 0]))

    def match_probability(
        self, grid: torch.Tensor, pooled: torch.Tensor, text_states: torch.Tensor, text_pad: torch.Tensor
    ) -> torch.Tensor:
        return self(grid, pooled, text_states, text_pad).softmax(dim=-1)[:, 1]


def save_itm(model: FusionItm, out_dir: Path | str, half: bool = True) -> Path:
    """Write the model folder; ``half`` stores float16 weights (loaded back into float32)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ITM_CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / ITM_WEIGHTS_FILE))
    return out


def load_itm(folder: Path | str) -> FusionItm:
    """The model in ``folder``, in eval mode on the CPU; a folder that is not an ITM model is a user error."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    config_file, weights_file = folder / ITM_CONFIG_FILE, folder / ITM_WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise ModelLoadError(f"{folder} is not a re-ranker model folder (no {ITM_CONFIG_FILE} and weights)")
    try:
        config = ItmConfig(**json.loads(config_file.read_text()))
        model = FusionItm(config)
        model.load_state_dict({k: v.float() for k, v in load_file(str(weights_file)).items()})
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the re-ranker in {folder}: {error}") from error
    return model.eval()


def write_verdict(out_dir: Path | str, best_r1: float, dual_r1: float, step: int | None) -> None:
    """Record how the kept weights did on validation against the dual encoder alone (``clipsearch train-itm``)."""
    verdict = {"rerank_r1": best_r1, "dual_r1": dual_r1, "step": step, "worse_than_dual_encoder": best_r1 < dual_r1}
    (Path(out_dir) / ITM_VERDICT_FILE).write_text(json.dumps(verdict, indent=2) + "\n")


def worse_than_dual(folder: Path | str) -> str | None:
    """Why the re-ranker in ``folder`` should not be used (its validation recall@1 is below the dual encoder's),
    or None: better, or never validated (a folder from before verdicts, or trained without a validation split)."""
    path = Path(folder).expanduser() / ITM_VERDICT_FILE
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not verdict.get("worse_than_dual_encoder"):
        return None
    return (
        f"the re-ranker in {folder} re-ranked worse than the dual encoder alone on its validation split "
        f"(recall@1 {100 * verdict['rerank_r1']:.1f} vs {100 * verdict['dual_r1']:.1f})"
    )
