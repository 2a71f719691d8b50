"""open_clip's CLIP text tower up to the last end-of-text token: the one definition.

The tower is causal and pools at each row's end-of-text position, so positions after the batch's last one cannot
change anything: a 5-word query runs ~8 of the 77 positions (several times faster, same vector). The torch encoder
(``encoder.Encoder``), the ONNX export (``text_export``, whose graph is this function traced), the ONNX runtime
(``text_onnx``, which cuts its token rows with ``truncated``) and the re-ranker's token path (``itm_tokens``) all
build on what is here. Importing this module needs no torch (the ONNX path uses ``truncated`` on numpy arrays).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

STANDARD_POOLS = ("argmax", "eos")


def end_positions(tokens: Any, eos_id: int | None = None) -> Any:
    """Each row's end-of-text position, for a numpy array or a torch tensor alike: the first ``eos_id``, or with
    none (CLIP's tokenizer) the argmax, since the end-of-text token has the largest id."""
    if eos_id is None:
        return tokens.argmax(-1)
    return ((tokens == eos_id) * 1).argmax(-1)


def truncated(tokens: Any, eos_id: int | None = None) -> Any:
    """Token rows cut after the batch's last end-of-text token: all a causal, end-pooled tower ever reads."""
    return tokens[:, : int(end_positions(tokens, eos_id).max()) + 1]


def is_standard_tower(model: Any) -> bool:
    """Whether ``model`` has open_clip's own CLIP text tower (causal mask, pooled at the end-of-text token), the
    one ``text_states`` reproduces; other towers go through their own ``encode_text``."""
    import open_clip

    pool = getattr(model, "text_pool_type", None)
    return (
        type(model).encode_text is open_clip.CLIP.encode_text
        and getattr(model, "attn_mask", None) is not None
        and pool in STANDARD_POOLS
        and not (pool == "eos" and getattr(model, "text_eos_id", None) is None)
    )


def eos_id_of(model: Any) -> int | None:
    """The token id ``end_positions`` looks for: None (the argmax) unless the tower pools at a given id."""
    return model.text_eos_id if getattr(model, "text_pool_type", None) == "eos" else None


def text_states(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (B, L, width) after the final LayerNorm, each row's end-of-text position (B,)) of a standard tower
    over ``tokens`` as given (cut them with ``truncated`` first; the ONNX graph gets them cut)."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    return x, end_positions(tokens, eos_id_of(model))


def pooled_features(model: Any, states: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The states at the end-of-text positions, projected and L2-normalised in float32 (also for half towers)."""
    import torch
    import torch.nn.functional as F

    x = states[torch.arange(states.shape[0], device=states.device), ends]
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return F.normalize(x.float(), dim=-1)


def text_features(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised float32 text features of (B, context) token rows, computed only up to the batch's last
    end-of-text token; a tower that is not the standard one runs its own ``encode_text``."""
    if not is_standard_tower(model):
        return model.encode_text(tokens, normalize=True).float()
    return pooled_features(model, *text_states(model, truncated(tokens, eos_id_of(model))))
