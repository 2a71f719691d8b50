"""open_clip's ViT image tower rewritten for export: the same weights and numbers, less work per image on the CPU.

Exported as written, open_clip's ViT runs ``nn.MultiheadAttention``, whose traced graph moves every block's tokens
to sequence-first and back (8 Transposes a block), splits the QKV projection three ways and reshapes each part;
its patch embedding is a Conv that ONNX Runtime runs one image at a time; and the last block computes every
token although the tower keeps only the class token. ``lean_image_tower`` runs the same blocks on the batch's
tokens as rows (every Linear one Gemm, its bias inside), with a Gemm and a Transpose each for query, key and value
(the query's weights scaled once), the patch embedding as one MatMul over the batch, and the last block for the
class token only (its keys and values still come from every token). ViT-B-32-256, 1 thread, batch 16: 13-14 % less
CPU an image, ViT-B-16 18 % (docs/benchmarks.md). Only a model whose tower has exactly the parts this repeats is
rewritten (``UnsupportedLean`` says why not; ``export_image_onnx`` then exports the tower as written). Export time
only: needs torch (imported inside, so the module imports without it).
"""

from __future__ import annotations

from typing import Any


class UnsupportedLean(Exception):
    """The image tower has a part the lean rewrite does not repeat; it is exported as written."""


def check_lean(model: Any) -> None:
    """The parts ``lean_image_tower`` repeats: a ``VisionTransformer`` with a square patch Conv, class-token or
    average pooling (no attentional pooler), and blocks of ``nn.MultiheadAttention`` (one packed QKV weight),
    LayerNorm, no layer scale and a two-layer MLP."""
    import torch
    from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer

    visual = getattr(model, "visual", None)
    if type(visual) is not VisionTransformer:
        raise UnsupportedLean(f"{type(visual).__name__} is not open_clip's VisionTransformer")
    conv = visual.conv1
    patch = tuple(conv.kernel_size)
    if (
        tuple(conv.stride) != patch
        or tuple(conv.padding) != (0, 0)
        or tuple(conv.dilation) != (1, 1)
        or conv.groups != 1
        or patch[0] != patch[1]
        or any(side % patch[0] for side in visual.image_size)
    ):
        raise UnsupportedLean("the patch embedding is not one patch per stride")
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg") or visual.output_tokens:
        raise UnsupportedLean(f"pooling {visual.pool_type!r} (or an attentional pooler)")
    if type(visual.transformer) is not Transformer or not visual.transformer.resblocks:
        raise UnsupportedLean(f"{type(visual.transformer).__name__} is not open_clip's Transformer")
    for block in visual.transformer.resblocks:
        attn = block.attn
        if (
            type(block) is not ResidualAttentionBlock
            or hasattr(block, "ln_1_kv")
            or not isinstance(attn, torch.nn.MultiheadAttention)
            or attn.in_proj_weight is None  # keys and values of another width: separate projections
            or attn.in_proj_bias is None
            or attn.bias_k is not None
            or attn.out_proj.bias is None
            or not isinstance(block.ls_1, torch.nn.Identity)
            or not isinstance(block.ls_2, torch.nn.Identity)
            or not all(isinstance(norm, torch.nn.LayerNorm) for norm in (block.ln_1, block.ln_2))
            or [name for name, _ in block.mlp.named_children()] != ["c_fc", "gelu", "c_proj"]
        ):
            raise UnsupportedLean("a block is not the plain pre-norm MultiheadAttention block")


def lean_image_tower(model: Any) -> Any:
    """A module computing ``normalize(model.encode_image(pixels))`` the lean way, sharing the model's weights;
    raises ``UnsupportedLean`` for a tower it does not fit."""
    import torch
    import torch.nn.functional as F

    check_lean(model)
    visual = model.visual

    class LeanImageTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual
            # Weights the rewrite reshapes or splits, made once here so that the graph holds them as plain
            # initializers (as it does the Linear weights), which int8 quantisation finds beside their MatMuls:
            # the patch weight as a matrix, and each block's QKV projection as three (the query's scaled by
            # 1/sqrt(head width): no Split and no scaling of the scores in the graph).
            conv = visual.conv1
            with torch.no_grad():
                self.register_buffer("patch_weight", conv.weight.reshape(conv.weight.shape[0], -1).clone(), False)
                for index, block in enumerate(visual.transformer.resblocks):
                    attn = block.attn
                    scale = (attn.embed_dim // attn.num_heads) ** -0.5
                    weights = attn.in_proj_weight.chunk(3)
                    biases = attn.in_proj_bias.chunk(3)
                    for part, weight, bias, factor in zip("qkv", weights, biases, (scale, 1.0, 1.0)):
                        self.register_buffer(f"{part}_weight_{index}", (weight * factor).contiguous(), False)
                        self.register_buffer(f"{part}_bias_{index}", (bias * factor).contiguous(), False)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = self.embed(pixels)
            batch, tokens, width = x.shape
            x = x.reshape(batch * tokens, width)  # the tokens of the batch as rows: every Linear is one Gemm
            blocks = list(self.visual.transformer.resblocks)
            for index, block in enumerate(blocks[:-1]):
                x = self.block(index, block, x, batch)
            class_only = self.visual.pool_type == "tok"  # the other tokens' last outputs are never read
            x = self.block(len(blocks) - 1, blocks[-1], x, batch, class_only)
            pooled = self.pool(x.reshape(batch, -1, width))
            if self.visual.proj is not None:
                pooled = pooled @ self.visual.proj
            return F.normalize(pooled.float(), dim=-1)

        def pool(self, x: torch.Tensor) -> torch.Tensor:
            """``VisionTransformer._pool`` without an attentional pooler: the class token or the mean of the
            others, layer-normed before or after pooling as the tower says."""
            visual = self.visual
            if not visual.final_ln_after_pool:
                x = visual.ln_post(x)
            pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)
            return visual.ln_post(pooled) if visual.final_ln_after_pool else pooled

        def embed(self, pixels: torch.Tensor) -> torch.Tensor:
            """``VisionTransformer._embeds`` with the patch Conv as one MatMul of the batch's patches."""
            conv = self.visual.conv1
            batch, channels, side = pixels.shape[0], pixels.shape[1], pixels.shape[-1]
            patch = conv.kernel_size[0]
            grid = side // patch
            patches = pixels.reshape(batch, channels, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
            patches = patches.reshape(batch, grid * grid, channels * patch * patch)
            x = F.linear(patches, self.patch_weight, conv.bias)
            token = self.visual.class_embedding.reshape(1, 1, -1).expand(batch, 1, -1).to(x.dtype)
            x = torch.cat([token, x], dim=1) + self.visual.positional_embedding.to(x.dtype)
            return self.visual.ln_pre(self.visual.patch_dropout(x))

        def block(self, index: int, block: Any, x: torch.Tensor, batch: int, class_only: bool = False) -> torch.Tensor:
            """``ResidualAttentionBlock.forward`` (the ``index``-th) on the batch's tokens as rows (N * L, D);
            ``class_only``: the output of each image's class token alone (N, D)."""
            y = block.ln_1(x)
            heads, width = block.attn.num_heads, x.shape[-1]
            head = width // heads

            def projected(part: str, rows: torch.Tensor) -> torch.Tensor:
                weight, bias = getattr(self, f"{part}_weight_{index}"), getattr(self, f"{part}_bias_{index}")
                return F.linear(rows, weight, bias).reshape(batch, -1, heads, head)

            if class_only:
                x = x.reshape(batch, -1, width)[:, 0]
                q = projected("q", y.reshape(batch, -1, width)[:, 0])
            else:
                q = projected("q", y)
            scores = q.transpose(1, 2) @ projected("k", y).permute(0, 2, 3, 1)  # (N, heads, L or 1, L)
            mixed = scores.softmax(dim=-1) @ projected("v", y).transpose(1, 2)
            x = x + F.linear(mixed.transpose(1, 2).reshape(x.shape[0], width), block.attn.out_proj.weight,
                             block.attn.out_proj.bias)  # fmt: skip
            return x + block.mlp(block.ln_2(x))

    return LeanImageTower()
