"""Reference attention: new attention layers through which a U-Net's transformer blocks attend from
the target's hidden states to the example features of the same resolution.

They are installed the way diffusers installs IP-Adapter: the cross-attention (``attn2``) processor of
each chosen transformer block is replaced by a :class:`ReferenceAttnProcessor` that runs the original
processor unchanged and adds ``to_out_ref(attention(q, to_k_ref(R), to_v_ref(R)))``, where ``R`` are
the reference features. ``to_out_ref`` starts at zero, so the installed model is exactly the base
model until it is trained.

The query comes in one of two ways (``query``):

- ``"shared"``: the cross-attention's own ``to_q`` (as IP-Adapter does), raw reference features, and
  ``to_k_ref`` / ``to_v_ref`` from PyTorch's default initialization. At the highest resolution such
  an attention stays close to uniform over the K * h * w reference tokens even after training (the
  default shipped toy model's 16x16 layers: normalized entropy 0.98-0.99), so it passes the subject's
  colors on as an average and loses where its markings are.
- ``"self"``: a query of its own, ``to_q_ref``, over layer-normalized reference features
  (``norm_ref``), with ``to_q_ref`` / ``to_k_ref`` / ``to_v_ref`` initialized from the block's
  self-attention (``attn1``), so the branch starts as that self-attention run over the examples. It
  is not sharper at initialization on the toy model, but after training it is (16x16: 0.89-0.92,
  8x8: 0.75-0.81 against 0.86-0.90; ``eval/incontext_probe.py``, docs/incontext.md).

Every other attention gets a :class:`PassReference` that runs its processor unchanged and ignores the
reference keyword (diffusers warns about keywords a processor does not take).

The features reach the processors as ``cross_attention_kwargs={"reference": ReferenceFeatures(...)}``,
so they travel with the call (gradient checkpointing re-runs blocks with the same arguments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from personalize.incontext.names import BLOCK_GROUPS, QUERY_MODES



@dataclass
class ReferenceFeatures:
    """Example features per resolution, ``tokens[h * w] = (batch, K * h * w, channels)``, and a
    per-sample ``mask`` (batch,) that scales the reference branch (0 = no references for that sample,
    used for reference dropout and for the unconditional terms of guidance)."""
    tokens: dict[int, torch.Tensor]
    mask: Optional[torch.Tensor] = None

    def for_tokens(self, sequence_length: int) -> torch.Tensor:
        if sequence_length not in self.tokens:
            raise KeyError(f"no reference features with {sequence_length} tokens per example (have "
                           f"{sorted(self.tokens)}): the references and the target must have the same resolution")
        return self.tokens[sequence_length]

    def repeat(self, times: int, mask: Optional[torch.Tensor] = None) -> "ReferenceFeatures":
        """The features for a batch repeated ``times`` (as classifier-free guidance stacks it)."""
        return ReferenceFeatures({k: v.repeat(times, 1, 1) for k, v in self.tokens.items()}, mask)


class PassReference:
    """Runs the wrapped processor unchanged; takes (and ignores) the ``reference`` keyword."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference: Optional[ReferenceFeatures] = None, **kwargs):
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)




class ReferenceAttnProcessor(nn.Module):
    """The original cross-attention processor plus attention to the reference features.

    ``query="self"`` gives the branch its own query and a LayerNorm over the features, and
    initializes the query, key and value projections from ``self_attention`` (the block's ``attn1``)
    when it is given (see the module docstring)."""

    def __init__(self, processor, hidden_size: int, reference_dim: int, heads: int, query: str = "shared",
                 self_attention: Optional[nn.Module] = None):
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {heads} heads")
        if query not in QUERY_MODES:
            raise ValueError(f"reference attention query {query!r}: choose from {', '.join(QUERY_MODES)}")
        self.processor, self.heads, self.query = processor, heads, query
        if query == "self":
            self.to_q_ref = nn.Linear(hidden_size, hidden_size, bias=False)
            self.norm_ref = nn.LayerNorm(reference_dim)
        self.to_k_ref = nn.Linear(reference_dim, hidden_size, bias=False)
        self.to_v_ref = nn.Linear(reference_dim, hidden_size, bias=False)
        self.to_out_ref = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.to_out_ref.weight)  # installed = the base model, exactly
        nn.init.zeros_(self.to_out_ref.bias)
        if query == "self" and self_attention is not None:
            with torch.no_grad():
                for own, theirs in ((self.to_q_ref, self_attention.to_q), (self.to_k_ref, self_attention.to_k),
                                    (self.to_v_ref, self_attention.to_v)):
                    if own.weight.shape == theirs.weight.shape:
                        own.weight.copy_(theirs.weight.float())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the queries over the reference keys (a method, so a probe can look at it)."""
        return F.scaled_dot_product_attention(q, k, v)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference: Optional[ReferenceFeatures] = None, **kwargs):
        out = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if reference is None:
            return out
        x = hidden_states
        if x.ndim == 4:  # (b, c, h, w) inputs of some blocks
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
        features = reference.for_tokens(x.shape[1]).to(x.dtype)
        if self.query == "self":
            features = self.norm_ref(features)
        if features.shape[0] != x.shape[0]:
            raise ValueError(f"reference features for {features.shape[0]} samples, hidden states for {x.shape[0]}")
        batch, n, _ = x.shape
        rows = None  # the samples that attend to references; those masked to 0 skip the branch entirely
        if reference.mask is not None:
            rows = reference.mask.nonzero().flatten()
            if rows.numel() == 0:
                return out
            x, features = x[rows], features[rows]
        b = x.shape[0]
        head_dim = self.to_k_ref.out_features // self.heads
        to_q = self.to_q_ref if self.query == "self" else attn.to_q
        q = to_q(x).view(b, n, self.heads, head_dim).transpose(1, 2)
        k = self.to_k_ref(features).view(b, -1, self.heads, head_dim).transpose(1, 2)
        v = self.to_v_ref(features).view(b, -1, self.heads, head_dim).transpose(1, 2)
        attended = self.attend(q, k, v).transpose(1, 2).reshape(b, n, -1)
        ref = self.to_out_ref(attended)
        if rows is not None:
            ref = ref * reference.mask[rows].to(ref.dtype).view(-1, 1, 1)
            ref = ref.new_zeros(batch, n, ref.shape[-1]).index_copy(0, rows, ref)
        if out.ndim == 4:
            ref = ref.transpose(1, 2).reshape(out.shape)
        return out + ref / attn.rescale_output_factor


def _group(name: str) -> str:
    return name.split(".", 1)[0].split("_")[0]  # "up_blocks.1...." -> "up", "mid_block...." -> "mid"


def reference_layer_names(unet, groups: Sequence[str] = ("up",)) -> list[str]:
    """The cross-attention processors (``...attn2.processor``) of the chosen block groups."""
    bad = [g for g in groups if g not in BLOCK_GROUPS]
    if bad or not groups:
        raise ValueError(f"reference attention blocks {list(groups)}: choose from {', '.join(BLOCK_GROUPS)}")
    return [name for name in unet.attn_processors if name.endswith("attn2.processor") and _group(name) in groups]


def install_reference_attention(unet, groups: Sequence[str] = ("up",), query: str = "shared") -> list[str]:
    """Install reference attention in the chosen block groups (see the module docstring; ``query``:
    ``"shared"`` or ``"self"``); returns the processor names that received it. Idempotent: an already
    installed model is left as it is."""
    if is_installed(unet):
        return [n for n, p in unet.attn_processors.items() if isinstance(p, ReferenceAttnProcessor)]
    chosen = set(reference_layer_names(unet, groups))
    if not chosen:
        raise ValueError(f"the U-Net has no cross-attention in its {'/'.join(groups)} blocks to add reference "
                         "attention to")
    modules = dict(unet.named_modules())
    processors = {}
    for name, processor in unet.attn_processors.items():
        if name in chosen:
            attn = modules[name.removesuffix(".processor")]
            hidden = attn.to_q.in_features
            self_attention = modules.get(name.removesuffix("attn2.processor") + "attn1")
            processors[name] = ReferenceAttnProcessor(processor, hidden, hidden, attn.heads, query, self_attention)
        else:
            processors[name] = PassReference(processor)
    device, dtype = unet.device, unet.dtype
    unet.set_attn_processor(processors)
    for p in processors.values():
        if isinstance(p, nn.Module):
            p.to(device=device, dtype=dtype)
    return sorted(chosen)


def is_installed(unet) -> bool:
    return any(isinstance(p, ReferenceAttnProcessor) for p in unet.attn_processors.values())


REFERENCE_LAYERS = ("to_q_ref", "norm_ref", "to_k_ref", "to_v_ref", "to_out_ref")


def _reference_named_parameters(unet) -> list[tuple[str, nn.Parameter]]:
    """The installed reference layers' parameters, named by their place in the U-Net."""
    return [(name, p) for name, p in unet.named_parameters()
            if ".processor." in name and name.rsplit(".", 2)[-2] in REFERENCE_LAYERS]


def reference_state_dict(unet) -> dict[str, torch.Tensor]:
    """The weights of the installed reference layers, keyed by their place in the U-Net."""
    return {name: p.detach().cpu().contiguous() for name, p in _reference_named_parameters(unet)}


def reference_parameters(unet) -> list[nn.Parameter]:
    return [p for _, p in _reference_named_parameters(unet)]
