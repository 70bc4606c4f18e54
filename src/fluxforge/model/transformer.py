"""The FLUX.2 MMDiT (rectified-flow transformer).

Architecture, for D = heads x head_dim:

    temb = MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g))]             # [B, D]; g only for dev
    mod_img, mod_txt = Linear(SiLU(temb)) -> 6D each                  # shared by every double block
    mod_single = Linear(SiLU(temb)) -> 3D                             # shared by every single block
    img, txt = x_embedder(img), context_embedder(txt)                 # [B, S_img, D], [B, S_txt, D]
    N x double block: separate weights per stream, one joint attention over [txt ; img]
    M x single block: z = [txt ; img], fused QKV + SwiGLU-MLP input projection, parallel attention and MLP
    out = proj_out(LN(img) * (1 + scale) + shift), with (scale, shift) = Linear(SiLU(temb))

Positions are 4-axis RoPE over (T, H, W, L) ids, interleaved pairs, applied to q and k after the
per-head QK RMSNorm. No Linear has a bias. Parameter names are those of diffusers'
`Flux2Transformer2DModel`, so its checkpoints load without renaming.

Reference KV (klein 9B KV): reference tokens are modulated with a fixed timestep and attend only to
themselves, so their per-layer keys and values depend on nothing else. `forward_extract` runs the first
step with the references placed before the noisy tokens and returns those K/V; `forward(...,
reference_kv=...)` reuses them in later steps without recomputing the reference tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxforge.config import TransformerConfig

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, k, v) [B, S, H, Dh] -> [B, S, H, Dh]


@dataclass
class ReferenceKV:
    """Keys and values of the reference tokens in every layer, after QK-norm and RoPE.

    Each entry is (k, v), both [B, N_ref, H, Dh]. They are independent of the prompt, the noise and the
    timestep, so one extraction serves every step (and every request with the same references)."""

    double: list[tuple[Tensor, Tensor]]
    single: list[tuple[Tensor, Tensor]]
    num_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in (*self.double, *self.single) for t in kv)


@dataclass
class Prepared:
    """What every step of one request shares, computed once (`Flux2Transformer.prepare`) rather than at each
    step: the text stream's input projection and the RoPE tables. The same numbers either way."""

    txt: Tensor  # context_embedder(text features): [B, S_txt, D]
    cos: Tensor  # [S_txt + S_img, Dh], text first
    sin: Tensor


@dataclass
class ExtractOutput:
    sample: Tensor  # [B, S_img, C]: velocity for the noisy tokens only; reference tokens are dropped
    reference_kv: ReferenceKV


# ---------------------------------------------------------------------------------------------------------
# Positions and timesteps


def rope_tables(ids: Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables [S, Dh] (float32) for ids [S, n_axes].

    Frequencies and angles are computed in float64 and each frequency is repeated for its pair of
    channels (c0, c0, c1, c1, ...), as the reference does; then cast to float32."""
    pos = ids.to(torch.float32).to(torch.float64)  # ids are cast through float32 first, like the reference
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(pos[:, axis], freqs)  # [S, dim/2]
        cos.append(angles.cos().repeat_interleave(2, dim=-1))
        sin.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). x [B, S, H, Dh]; the
    rotation runs in float32 and the result takes x's dtype."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x1, x0), dim=-1).flatten(-2)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [S, 1, Dh], broadcast over heads
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def timestep_sinusoid(t: Tensor, channels: int) -> Tensor:
    """[B] -> [B, channels]: (cos | sin) of t * exp(-ln(10000) j / half), computed in float32."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def _mismatched_ids_error(name: str) -> ValueError:
    return ValueError(
        f"{name} differ across the batch; FLUX.2 uses one set of positions for the whole batch. "
        f"Pass {name} as [S, 4] (or identical rows per batch element)."
    )


def _positions(ids: Tensor, name: str) -> Tensor:
    """[S, 4] ids from [S, 4] or [B, S, 4] (which must be the same for every batch element)."""
    if ids.ndim == 2:
        return ids
    if ids.ndim == 3:
        if ids.shape[0] > 1 and not bool((ids == ids[:1]).all()):
            raise _mismatched_ids_error(name)
        return ids[0]
    raise ValueError(f"{name} must be [S, 4] or [B, S, 4], got shape {tuple(ids.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Attention modes


def _full_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _extract_attention(n_txt: int, n_ref: int, store: list[tuple[Tensor, Tensor]]) -> Attend:
    """Joint layout [txt, ref, img]: text and image queries see every key, reference queries only the
    reference keys (block-causal). The reference K/V are stored for later steps."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ref = slice(n_txt, n_txt + n_ref)
        k_ref, v_ref = k[:, ref], v[:, ref]
        store.append((k_ref.clone(), v_ref.clone()))
        q_other = torch.cat([q[:, :n_txt], q[:, n_txt + n_ref :]], dim=1)
        out_other = _full_attention(q_other, k, v)
        out_ref = _full_attention(q[:, ref], k_ref, v_ref)
        return torch.cat([out_other[:, :n_txt], out_ref, out_other[:, n_txt:]], dim=1)

    return attend


def _cached_attention(n_txt: int, k_ref: Tensor, v_ref: Tensor) -> Attend:
    """Joint layout [txt, img]: the cached reference K/V are inserted between text and image keys."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        batch = q.shape[0]
        if k_ref.shape[0] == 1:  # one copy for the whole batch
            kr, vr = k_ref.expand(batch, -1, -1, -1), v_ref.expand(batch, -1, -1, -1)
        else:  # one row per image (or per image twice, for batched CFG)
            kr, vr = (t.repeat(batch // k_ref.shape[0], 1, 1, 1) for t in (k_ref, v_ref))
        k = torch.cat([k[:, :n_txt], kr.to(k.dtype), k[:, n_txt:]], dim=1)
        v = torch.cat([v[:, :n_txt], vr.to(v.dtype), v[:, n_txt:]], dim=1)
        return _full_attention(q, k, v)

    return attend


# ---------------------------------------------------------------------------------------------------------
# Layers, small to large


class TimestepMLP(nn.Module):
    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, guidance: bool) -> None:
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepMLP(channels, dim)
        self.guidance_embedder = TimestepMLP(channels, dim) if guidance else None

    def forward(self, t: Tensor, g: Tensor | None) -> Tensor:
        """t, g: [B] already scaled by 1000 -> temb [B, D]."""
        temb = self.timestep_embedder(timestep_sinusoid(t, self.channels))
        if g is not None and self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(g, self.channels))
        return temb


class Modulation(nn.Module):
    """Linear(SiLU(temb)) -> n_sets x (shift, scale, gate), shared by all blocks of one stream."""

    def __init__(self, dim: int, n_sets: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 3 * n_sets * dim, bias=False)

    def forward(self, temb: Tensor) -> Tensor:
        return self.linear(F.silu(temb))[:, None, :]  # [B, 1, 3 * n_sets * D]


class FeedForward(nn.Module):
    """SwiGLU: linear_out(SiLU(a) * b) with [a | b] = linear_in(x); the first half is the gate."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.linear_in(x).chunk(2, dim=-1)
        return self.linear_out(F.silu(gate) * value)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=eps) + shift


def _clamp_fp16(x: Tensor) -> Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.add_q_proj = nn.Linear(dim, dim, bias=False)
        self.add_k_proj = nn.Linear(dim, dim, bias=False)
        self.add_v_proj = nn.Linear(dim, dim, bias=False)
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_add_out = nn.Linear(dim, dim, bias=False)

    def forward(
        self, img: Tensor, txt: Tensor, cos: Tensor, sin: Tensor, attend: Attend
    ) -> tuple[Tensor, Tensor]:
        def heads(x: Tensor) -> Tensor:
            return x.unflatten(-1, (-1, self.head_dim))  # [B, S, H, Dh]

        q = torch.cat([self.norm_added_q(heads(self.add_q_proj(txt))), self.norm_q(heads(self.to_q(img)))], 1)
        k = torch.cat([self.norm_added_k(heads(self.add_k_proj(txt))), self.norm_k(heads(self.to_k(img)))], 1)
        v = torch.cat([heads(self.add_v_proj(txt)), heads(self.to_v(img))], 1)
        out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v).flatten(2)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights and modulation, joined only in attention."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim, self.eps = cfg.inner_dim, cfg.eps
        self.attn = DoubleStreamAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps)
        self.ff = FeedForward(dim, cfg.mlp_hidden_dim)
        self.ff_context = FeedForward(dim, cfg.mlp_hidden_dim)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        mod_img: Tensor,
        mod_txt: Tensor,
        cos: Tensor,
        sin: Tensor,
        attend: Attend,
    ) -> tuple[Tensor, Tensor]:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod_img.chunk(6, dim=-1)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = mod_txt.chunk(6, dim=-1)
        img_attn, txt_attn = self.attn(
            _modulate(img, shift, scale, self.eps),
            _modulate(txt, c_shift, c_scale, self.eps),
            cos,
            sin,
            attend,
        )
        img = img + gate * img_attn
        img = img + gate_mlp * self.ff(_modulate(img, shift_mlp, scale_mlp, self.eps))
        txt = txt + c_gate * txt_attn
        txt = txt + c_gate_mlp * self.ff_context(_modulate(txt, c_shift_mlp, c_scale_mlp, self.eps))
        return img, _clamp_fp16(txt)


class SingleStreamAttention(nn.Module):
    """One projection yields q, k, v and the MLP input; attention and MLP run in parallel."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.head_dim, self.dim, self.mlp_hidden = head_dim, dim, mlp_hidden
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.Linear(dim + mlp_hidden, dim, bias=False)

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        """q and k (after QK-norm and RoPE) and v, [B, S, H, Dh], and the MLP's gate and value."""
        q, k, v, gate, value = self.to_qkv_mlp_proj(x).split(
            [self.dim, self.dim, self.dim, self.mlp_hidden, self.mlp_hidden], dim=-1
        )
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        return apply_rope(self.norm_q(q), cos, sin), apply_rope(self.norm_k(k), cos, sin), v, gate, value

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        q, k, v, gate, value = self._project(x, cos, sin)
        return self._output(attend(q, k, v), gate, value)

    def _output(self, attended: Tensor, gate: Tensor, value: Tensor) -> Tensor:
        return self.to_out(torch.cat([attended.flatten(2), F.silu(gate) * value], dim=-1))

    def keys_values(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The k and v that `forward` computes, without its attention, MLP and output projection: what the
        reference K/V of the last layer need."""
        _, k, v, _, _ = self._project(x, cos, sin)
        return k, v.contiguous()  # its own storage, not the projection's

    def forward_rows(self, x: Tensor, rows: slice, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        """`forward`'s output for the tokens `rows` only: the keys and values of every token, but the
        queries, the MLP and the output projection of those rows alone (the same products, row for row)."""
        proj, d = self.to_qkv_mlp_proj, self.dim
        if proj._forward_hooks or proj._forward_pre_hooks:  # unfused LoRA: the projection as a whole
            q, k, v, gate, value = self._project(x, cos, sin)
            q, gate, value = q[:, rows], gate[:, rows], value[:, rows]
        else:  # the weight's row blocks: keys and values for all tokens, the rest for `rows`
            k, v = F.linear(x, proj.weight[d : 3 * d]).split(d, dim=-1)
            q = F.linear(x[:, rows], proj.weight[:d])
            gate, value = F.linear(x[:, rows], proj.weight[3 * d :]).split(self.mlp_hidden, dim=-1)
            q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
            q, k = apply_rope(self.norm_q(q), cos[rows], sin[rows]), apply_rope(self.norm_k(k), cos, sin)
        return self._output(attend(q, k, v), gate, value)


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.attn = SingleStreamAttention(
            cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_hidden_dim, cfg.eps
        )

    def forward(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        shift, scale, gate = mod.chunk(3, dim=-1)
        x = x + gate * self.attn(_modulate(x, shift, scale, self.eps), cos, sin, attend)
        return _clamp_fp16(x)

    def keys_values(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale, _ = mod.chunk(3, dim=-1)
        return self.attn.keys_values(_modulate(x, shift, scale, self.eps), cos, sin)

    def forward_rows(
        self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor, attend: Attend, rows: slice
    ) -> Tensor:
        """`forward(...)[:, rows]`, without the work for the other tokens' outputs (their keys and values
        are still computed: the rows attend to them). `mod`: one modulation per row, [B, 1, 3D]."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        out = self.attn.forward_rows(_modulate(x, shift, scale, self.eps), rows, cos, sin, attend)
        return _clamp_fp16(x[:, rows] + gate * out)


class OutputNorm(nn.Module):
    """LN(x) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(temb)); scale comes first."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def modulation(self, temb: Tensor) -> Tensor:
        return self.linear(F.silu(temb).to(self.linear.weight.dtype))  # [B, 2D]: scale | shift

    def forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        scale, shift = modulation.chunk(2, dim=-1)
        return _modulate(x, shift[:, None], scale[:, None], self.eps)


class Flux2Transformer(nn.Module):
    """The FLUX.2 DiT. Inputs: packed image tokens [B, S_img, C], text features [B, S_txt, joint_dim],
    the sigma in [0, 1] per batch element, and (T, H, W, L) position ids for both sequences."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        self.time_guidance_embed = TimeGuidanceEmbed(cfg.timestep_guidance_channels, dim, cfg.guidance_embeds)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = nn.Linear(cfg.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)
        )
        self.norm_out = OutputNorm(dim, cfg.eps)
        self.proj_out = nn.Linear(dim, cfg.output_channels, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def rope(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin tables [S, Dh] for position ids [S, 4]."""
        return rope_tables(ids, self.config.axes_dims_rope, self.config.rope_theta)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor | None = None,
        *,
        reference_kv: ReferenceKV | None = None,
        row_groups: Sequence[int] | None = None,
        prepared: Prepared | None = None,
        out_tokens: int | None = None,
    ) -> Tensor:
        """Velocity for every image-stream token, [B, S_img, C], or for the first `out_tokens` of them (the
        noisy tokens, when references follow them in the sequence): the last layer then computes only those.

        With `reference_kv`, the cached reference keys and values join every attention (between text and
        image keys), exactly as if the reference tokens were in the sequence. `row_groups` (row counts that
        sum to B): the batch is several requests, and each group's timestep embedding and modulation are
        computed on its own rows, as they are when it runs alone (products of one row and of several round
        differently, and these are the only per-image products whose rows are few). `prepared`: this
        request's `prepare(txt, img_ids, txt_ids)`, computed once for all its steps."""
        if reference_kv is not None and (len(reference_kv.double), len(reference_kv.single)) != (
            len(self.transformer_blocks),
            len(self.single_transformer_blocks),
        ):
            raise ValueError(
                f"reference_kv holds {len(reference_kv.double)} + {len(reference_kv.single)} layers, but "
                f"this model has {len(self.transformer_blocks)} + {len(self.single_transformer_blocks)}: "
                "it was extracted by another model"
            )
        return self._run(
            img, txt, timestep, img_ids, txt_ids, guidance,
            reference_kv=reference_kv, row_groups=row_groups, prepared=prepared, out_tokens=out_tokens,
        )[0]  # fmt: skip

    def forward_extract(
        self,
        img: Tensor,
        txt: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        num_ref_tokens: int,
        guidance: Tensor | None = None,
        ref_timestep: float = 0.0,
    ) -> ExtractOutput:
        """First step of reference-KV sampling. `img` is [ref ; noisy] (references first) with matching
        ids; reference tokens use the modulation of `ref_timestep` and attend only to themselves. Returns
        the velocity of the noisy tokens and the reference K/V of every layer."""
        if not 0 < num_ref_tokens <= img.shape[1]:
            raise ValueError(f"num_ref_tokens must be in 1..{img.shape[1]}, got {num_ref_tokens}")
        sample, kv = self._run(
            img, txt, timestep, img_ids, txt_ids, guidance, num_ref=num_ref_tokens, ref_timestep=ref_timestep
        )
        assert kv is not None
        return ExtractOutput(sample, kv)

    def reference_kv(
        self,
        ref: Tensor,
        ref_ids: Tensor,
        guidance: Tensor | None = None,
        ref_timestep: float = 0.0,
    ) -> ReferenceKV:
        """The reference K/V of every layer from the reference tokens alone ([1, N, C] and their ids), with no
        text and no noisy tokens: reference tokens attend only to themselves at `ref_timestep`, so this is
        what `forward_extract` stores, computed once for any prompt, noise, step and batch."""
        if ref.ndim != 3 or ref.shape[1] == 0:
            raise ValueError(
                f"ref must be [B, N_ref, C] reference tokens with N_ref >= 1, got {list(ref.shape)}"
            )
        txt = ref.new_zeros(ref.shape[0], 0, self.config.joint_attention_dim)
        t = ref.new_full((ref.shape[0],), ref_timestep)
        _, kv = self._run(
            ref, txt, t, ref_ids, torch.zeros(0, 4, dtype=torch.int64, device=ref.device), guidance,
            num_ref=ref.shape[1], ref_timestep=ref_timestep,
        )  # fmt: skip
        assert kv is not None
        return kv

    def prepare(self, txt: Tensor, img_ids: Tensor, txt_ids: Tensor) -> Prepared:
        """The inputs that do not change between the steps of one request (the text stream's projection,
        the RoPE tables of these ids), for `forward(..., prepared=)`; `img_ids` as the steps pass them."""
        return self._prepare(txt, _positions(img_ids, "img_ids"), _positions(txt_ids, "txt_ids"))

    def _prepare(self, txt: Tensor, img_pos: Tensor, txt_pos: Tensor) -> Prepared:
        cos, sin = self.rope(torch.cat([txt_pos, img_pos], dim=0))  # text first, as in the joint sequence
        return Prepared(self.context_embedder(txt.to(self.dtype)), cos, sin)

    def _check_inputs(
        self, img: Tensor, txt: Tensor, timestep: Tensor, img_pos: Tensor, txt_pos: Tensor
    ) -> None:
        cfg = self.config
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"img must be [B, S_img, {cfg.in_channels}] latent tokens, got {list(img.shape)}"
            )
        if txt.ndim != 3 or txt.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"txt must be [B, S_txt, {cfg.joint_attention_dim}] text features, got {list(txt.shape)}"
            )
        if txt.shape[0] != img.shape[0] or timestep.numel() not in (1, img.shape[0]):
            raise ValueError(
                f"batch sizes differ: img {img.shape[0]}, txt {txt.shape[0]}, timestep {timestep.numel()} "
                "(a timestep may also be a single value for the whole batch)"
            )
        for name, pos, tokens in (("img_ids", img_pos, img), ("txt_ids", txt_pos, txt)):
            if tuple(pos.shape) != (tokens.shape[1], 4):
                raise ValueError(
                    f"{name} must hold one (T, H, W, L) row per token, [{tokens.shape[1]}, 4]; "
                    f"got {list(pos.shape)}"
                )

    def _run(
        self,
        img: Tensor,
        txt: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor | None,
        *,
        num_ref: int = 0,
        ref_timestep: float = 0.0,
        reference_kv: ReferenceKV | None = None,
        row_groups: Sequence[int] | None = None,
        prepared: Prepared | None = None,
        out_tokens: int | None = None,
    ) -> tuple[Tensor, ReferenceKV | None]:
        img_pos, txt_pos = _positions(img_ids, "img_ids"), _positions(txt_ids, "txt_ids")
        self._check_inputs(img, txt, timestep, img_pos, txt_pos)
        img, txt = img.to(self.dtype), txt.to(self.dtype)
        n_txt, n_img = txt.shape[1], img.shape[1] - num_ref
        if out_tokens is not None and not 0 < out_tokens <= n_img:
            raise ValueError(f"out_tokens must be in 1..{n_img} (the image-stream tokens), got {out_tokens}")
        # Cast before x1000, as the reference does (this quantizes t and g in bf16). [B], [1] or a scalar.
        t = timestep.to(img.dtype).reshape(-1) * 1000
        g = guidance.to(img.dtype).reshape(-1) * 1000 if guidance is not None else None
        if row_groups is not None:
            if sum(row_groups) != img.shape[0]:
                raise ValueError(f"row_groups {list(row_groups)} must add up to the batch, {img.shape[0]}")
            if len(row_groups) < 2 or t.shape[0] != img.shape[0]:
                row_groups = None  # one group, or one timestep for the whole batch: nothing to split

        def grouped(fn: Callable[..., Tensor], *xs: Tensor | None) -> Tensor:
            if row_groups is None:
                return fn(*xs)
            parts = [x.split(list(row_groups)) if x is not None else [None] * len(row_groups) for x in xs]
            return torch.cat([fn(*group) for group in zip(*parts, strict=True)])

        temb = grouped(self.time_guidance_embed, t, g)  # [B, D]
        mod_img = grouped(self.double_stream_modulation_img, temb)  # [B, 1, 6D]
        mod_txt = grouped(self.double_stream_modulation_txt, temb)  # [B, 1, 6D]
        mod_single = grouped(self.single_stream_modulation, temb)  # [B, 1, 3D]
        alone = num_ref == img.shape[1] and n_txt == 0  # the reference tokens alone (`reference_kv`)
        if num_ref:
            # Reference tokens are modulated with a fixed timestep: per-token modulation [B, S, .].
            ref_temb = self.time_guidance_embed(torch.full_like(t, ref_timestep * 1000), g)
            ref_img, ref_single = (
                self.double_stream_modulation_img(ref_temb),
                self.single_stream_modulation(ref_temb),
            )
        if alone:  # one modulation for every token: no per-token copy of it
            mod_img, mod_single = ref_img, ref_single
        elif num_ref:
            mod_img = torch.cat([ref_img.expand(-1, num_ref, -1), mod_img.expand(-1, n_img, -1)], dim=1)
            mod_single = torch.cat(
                [
                    mod_single.expand(-1, n_txt, -1),
                    ref_single.expand(-1, num_ref, -1),
                    mod_single.expand(-1, n_img, -1),
                ],
                dim=1,
            )

        if prepared is None:
            prepared = self._prepare(txt, img_pos, txt_pos)
        elif prepared.txt.shape[:2] != txt.shape[:2] or prepared.cos.shape[0] != n_txt + img.shape[1]:
            raise ValueError(
                f"prepared inputs are for {prepared.txt.shape[0]} x {prepared.txt.shape[1]} text tokens and "
                f"{prepared.cos.shape[0]} positions, not {txt.shape[0]} x {n_txt} and "
                f"{n_txt + img.shape[1]}: prepare them with this step's text and ids"
            )
        cos, sin, txt = prepared.cos, prepared.sin, prepared.txt
        img = self.x_embedder(img)  # [B, S_img, D]
        double_kv: list[tuple[Tensor, Tensor]] = []
        single_kv: list[tuple[Tensor, Tensor]] = []
        for i, block in enumerate(self.transformer_blocks):
            attend = _attention(n_txt, num_ref, double_kv, reference_kv and reference_kv.double[i])
            img, txt = block(img, txt, mod_img, mod_txt, cos, sin, attend)
        x = torch.cat([txt, img], dim=1)  # [B, S_txt + S_img, D]
        start = n_txt + num_ref
        wanted = slice(start, start + (n_img if out_tokens is None else out_tokens))  # the rows returned
        last = len(self.single_transformer_blocks) - 1
        for i, block in enumerate(self.single_transformer_blocks):
            if alone and i == last:
                # Nothing reads the references' outputs: the last layer only needs their keys and values.
                k, v = block.keys_values(x, mod_single, cos, sin)
                single_kv.append((k, v))
                return x[:, :0], ReferenceKV(double_kv, single_kv, num_ref)
            attend = _attention(n_txt, num_ref, single_kv, reference_kv and reference_kv.single[i])
            if i == last and not num_ref:
                # Nor does anything read the text tokens' outputs, or those of references that follow the
                # noisy tokens: the last layer computes the rows returned, attending to every token.
                x, wanted = block.forward_rows(x, mod_single, cos, sin, attend, wanted), slice(None)
            else:
                x = block(x, mod_single, cos, sin, attend)
        out = self.proj_out(self.norm_out(x[:, wanted], grouped(self.norm_out.modulation, temb)))
        kv = ReferenceKV(double_kv, single_kv, num_ref) if num_ref else None
        return out, kv


def _attention(
    n_txt: int, num_ref: int, store: list[tuple[Tensor, Tensor]], cached: tuple[Tensor, Tensor] | None
) -> Attend:
    """The attention of one layer: plain, extracting the reference K/V into `store`, or using `cached`."""
    if num_ref:
        return _extract_attention(n_txt, num_ref, store)
    if cached is not None:
        return _cached_attention(n_txt, *cached)
    return _full_attention
