"""The transformer against diffusers' Flux2Transformer2DModel on tiny random weights (fp32, CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
)
from tiny import grid_ids, text_ids, tiny_diffusers_transformer

from fluxforge.config import TransformerConfig
from fluxforge.model.transformer import Flux2Transformer

TOL = 1e-5


def ours_from(ref) -> Flux2Transformer:
    with torch.device("meta"):
        model = Flux2Transformer(TransformerConfig.from_dict(dict(ref.config)))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return model.eval()


def inputs(batch: int, refs: int = 0, seed: int = 1, n_txt: int = 7):
    """Noisy 4x3 grid plus `refs` reference grids (3x2, T = 10, 20, ...) after it; text of n_txt tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = [grid_ids(4, 3)] + [grid_ids(3, 2, t=10 * (i + 1)) for i in range(refs)]
    img_ids = torch.cat(ids)
    return dict(
        img=torch.randn(batch, img_ids.shape[0], 4, generator=gen),
        txt=torch.randn(batch, n_txt, 32, generator=gen),
        timestep=torch.rand(batch, generator=gen),
        img_ids=img_ids,
        txt_ids=text_ids(n_txt),
    )


def diffusers_call(ref, x, guidance=None, **kw):
    with torch.no_grad():
        return ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timestep"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=guidance,
            return_dict=False,
            **kw,
        )


@pytest.mark.parametrize("guidance_embeds", [False, True])
@pytest.mark.parametrize("batch,refs", [(1, 0), (2, 0), (2, 2)])
def test_forward_matches_diffusers(guidance_embeds, batch, refs):
    ref = tiny_diffusers_transformer(guidance_embeds)
    ours = ours_from(ref)
    x = inputs(batch, refs)
    guidance = torch.tensor([3.5, 5.0][:batch]) if guidance_embeds else None
    expected = diffusers_call(ref, x, guidance)[0]
    with torch.no_grad():
        got = ours(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], guidance)
    assert got.shape == expected.shape == (batch, x["img"].shape[1], 4)
    assert (got - expected).abs().max() <= TOL


def test_guidance_changes_the_output_only_with_a_guidance_embedder():
    ours = ours_from(tiny_diffusers_transformer(guidance_embeds=True))
    x = inputs(1)
    with torch.no_grad():
        a = ours(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], torch.tensor([1.0]))
        b = ours(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], torch.tensor([4.0]))
    assert (a - b).abs().max() > 1e-3


def test_batched_ids_must_agree():
    ours = ours_from(tiny_diffusers_transformer())
    x = inputs(2)
    ids = torch.stack([x["img_ids"], x["img_ids"]])
    ids[1, 0, 1] += 1
    with torch.no_grad(), pytest.raises(ValueError, match="img_ids differ across the batch"):
        ours(x["img"], x["txt"], x["timestep"], ids, x["txt_ids"])
    same = torch.stack([x["img_ids"], x["img_ids"]])
    with torch.no_grad():
        a = ours(x["img"], x["txt"], x["timestep"], same, x["txt_ids"])
        b = ours(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"])
    assert torch.equal(a, b)


def kv_reference_model(guidance_embeds: bool = False):
    ref = tiny_diffusers_transformer(guidance_embeds)
    for block in ref.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return ref


def kv_inputs(batch: int, seed: int = 2):
    """KV layout: two references (T = 10, 20) *before* the noisy 4x3 grid."""
    x = inputs(batch, refs=0, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    ref_ids = torch.cat([grid_ids(3, 2, t=10), grid_ids(2, 2, t=20)])
    refs = torch.randn(batch, ref_ids.shape[0], 4, generator=gen)
    refs[1:] = refs[:1]  # references are shared by the batch in the pipelines
    return x, refs, ref_ids


@pytest.mark.parametrize("guidance_embeds", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_kv_extract_and_cached_match_diffusers(guidance_embeds, batch):
    ref = kv_reference_model(guidance_embeds)
    ours = ours_from(ref)
    x, refs, ref_ids = kv_inputs(batch)
    n_ref = ref_ids.shape[0]
    guidance = torch.full((batch,), 4.0) if guidance_embeds else None
    step0 = dict(x, img=torch.cat([refs, x["img"]], 1), img_ids=torch.cat([ref_ids, x["img_ids"]]))

    expected, cache = diffusers_call(ref, step0, guidance, kv_cache_mode="extract", num_ref_tokens=n_ref)
    with torch.no_grad():
        got = ours.forward_extract(
            step0["img"], x["txt"], x["timestep"], step0["img_ids"], x["txt_ids"], n_ref, guidance
        )
    assert got.sample.shape == expected.shape == x["img"].shape
    assert (got.sample - expected).abs().max() <= TOL
    kv = got.reference_kv
    assert kv.num_tokens == n_ref and len(kv.double) == 2 and len(kv.single) == 2
    for mine, theirs in zip(
        kv.double + kv.single, cache.double_block_caches + cache.single_block_caches, strict=True
    ):
        assert mine[0].shape == theirs.k_ref.shape == (batch, n_ref, 2, 16)
        assert (mine[0] - theirs.k_ref).abs().max() <= TOL
        assert (mine[1] - theirs.v_ref).abs().max() <= TOL

    # A later step: new noise and timestep, reusing the cache.
    later = inputs(batch, seed=9)
    expected = diffusers_call(ref, later, guidance, kv_cache=cache, kv_cache_mode="cached")[0]
    with torch.no_grad():
        got = ours(
            later["img"],
            later["txt"],
            later["timestep"],
            later["img_ids"],
            later["txt_ids"],
            guidance,
            reference_kv=kv,
        )
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_reference_kv_alone_matches_the_diffusers_extract(guidance_embeds):
    """The pipelines' path: the references' K/V from their tokens alone (no text, no noisy tokens; the last
    layer computes only its keys and values) are diffusers' extract-step K/V for any prompt and noise."""
    ref = kv_reference_model(guidance_embeds)
    ours = ours_from(ref)
    x, refs, ref_ids = kv_inputs(1)
    guidance = torch.full((1,), 4.0) if guidance_embeds else None
    step0 = dict(x, img=torch.cat([refs, x["img"]], 1), img_ids=torch.cat([ref_ids, x["img_ids"]]))
    _, cache = diffusers_call(ref, step0, guidance, kv_cache_mode="extract", num_ref_tokens=ref_ids.shape[0])
    with torch.no_grad():
        kv = ours.reference_kv(refs, ref_ids, guidance)
    theirs = cache.double_block_caches + cache.single_block_caches
    for mine, them in zip(kv.double + kv.single, theirs, strict=True):
        assert mine[0].shape == them.k_ref.shape and mine[1].is_contiguous()
        assert (mine[0] - them.k_ref).abs().max() <= TOL and (mine[1] - them.v_ref).abs().max() <= TOL


def extract_step(model, x, refs, ref_ids):
    """forward_extract with the references placed before the noisy tokens."""
    img, ids = torch.cat([refs, x["img"]], 1), torch.cat([ref_ids, x["img_ids"]])
    return model.forward_extract(img, x["txt"], x["timestep"], ids, x["txt_ids"], ref_ids.shape[0])


def test_reference_kv_is_independent_of_prompt_noise_and_timestep():
    ours = ours_from(tiny_diffusers_transformer())
    _, refs, ref_ids = kv_inputs(1)
    kvs = []
    for seed in (3, 4):
        x = inputs(1, seed=seed)
        with torch.no_grad():
            out = extract_step(ours, x, refs, ref_ids)
        kvs.append(out.reference_kv)
    for a, b in zip(kvs[0].double + kvs[0].single, kvs[1].double + kvs[1].single, strict=True):
        assert (a[0] - b[0]).abs().max() <= 1e-6 and (a[1] - b[1]).abs().max() <= 1e-6


def test_cached_step_equals_the_extract_step():
    """The cache is exact: the same step run in cached mode gives the extract-mode output."""
    ours = ours_from(tiny_diffusers_transformer())
    x, refs, ref_ids = kv_inputs(2)
    with torch.no_grad():
        extract = extract_step(ours, x, refs, ref_ids)
        cached = ours(
            x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], reference_kv=extract.reference_kv
        )
    assert (cached - extract.sample).abs().max() <= TOL


def test_meta_construction_has_the_diffusers_keys_and_shapes():
    ref = tiny_diffusers_transformer(guidance_embeds=True)
    with torch.device("meta"):
        ours = Flux2Transformer(TransformerConfig.from_dict(dict(ref.config)))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs


@contextmanager
def whole_last_layer(model: Flux2Transformer, seen: list[int] | None = None) -> Iterator[None]:
    """The last layer computed for every token and its returned rows taken after, as diffusers does (the
    model computes only those rows); `seen` collects the token counts that layer saw."""
    block = model.single_transformer_blocks[-1]

    def whole(x, mod, cos, sin, attend, rows):
        if seen is not None:
            seen.append(x.shape[1])
        return type(block).forward(block, x, mod, cos, sin, attend)[:, rows]

    block.forward_rows = whole
    try:
        yield
    finally:
        del block.forward_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_half_precision_matches_diffusers_bit_for_bit(guidance_embeds, dtype):
    """Same operations in the same order and dtypes (timestep cast before x1000, RoPE in fp32, fp16
    clamping of the text and single streams): the outputs are identical, not merely close. This holds on every
    CPU with the whole last layer: both sides call the same matmul and attention kernels on tensors of the
    same shapes and layouts, so whichever kernel the CPU gets (AVX2, AVX-512, AMX), it is the same one for
    both. The model's own last layer computes fewer rows, which kernels may round otherwise: within a few
    roundings of the half-precision result (bit for bit on an AMD EPYC, natively and with AVX2 kernels)."""
    ref = tiny_diffusers_transformer(guidance_embeds).to(dtype)
    ours = ours_from(ref)
    x = inputs(2, refs=1)
    x = {k: v.to(dtype) if k in ("img", "txt") else v for k, v in x.items()}
    guidance = torch.tensor([3.5, 5.0]) if guidance_embeds else None
    expected = diffusers_call(ref, x, guidance)[0]
    args = (x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], guidance)
    with torch.no_grad():
        got = ours(*args)
        with whole_last_layer(ours):
            whole = ours(*args)
    assert got.dtype == whole.dtype == dtype
    assert torch.equal(whole, expected)
    eps = torch.finfo(dtype).eps
    assert ((got.float() - expected.float()).abs() <= 4 * eps * expected.float().abs().clamp_min(1)).all()


def test_reference_kv_from_another_model_is_rejected():
    x, refs, ref_ids = kv_inputs(1)
    kv = extract_step(ours_from(tiny_diffusers_transformer()), x, refs, ref_ids).reference_kv
    other = ours_from(tiny_diffusers_transformer(num_single_layers=3))
    with torch.no_grad(), pytest.raises(ValueError, match="holds 2 \\+ 2 layers, but this model has 2 \\+ 3"):
        other(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], reference_kv=kv)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(img=torch.zeros(1, 12, 5)), r"img must be \[B, S_img, 4\] latent tokens, got \[1, 12, 5\]"),
        (dict(txt=torch.zeros(1, 7, 31)), r"txt must be \[B, S_txt, 32\] text features"),
        (dict(txt=torch.zeros(2, 7, 32)), "batch sizes differ: img 1, txt 2"),
        (
            dict(img_ids=grid_ids(3, 3)),
            r"img_ids must hold one \(T, H, W, L\) row per token, \[12, 4\]; got \[9, 4\]",
        ),
        (dict(txt_ids=text_ids(7)[:, :3]), r"txt_ids must hold one .* \[7, 4\]; got \[7, 3\]"),
    ],
)
def test_bad_inputs_say_what_was_expected(change, message):
    ours = ours_from(tiny_diffusers_transformer())
    x = {**inputs(1), **change}
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        ours(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"])


def test_real_head_dim_and_rope_axes_match_diffusers():
    """Head dim 128 with the real (32, 32, 32, 32) RoPE axes, ids in the ranges a 1024px image with a
    reference and a long prompt produce (H, W up to 63, T = 10, L up to 511)."""
    ref = tiny_diffusers_transformer(
        guidance_embeds=True,
        attention_head_dim=128,
        axes_dims_rope=(32, 32, 32, 32),
        num_layers=1,
        num_single_layers=1,
    )
    ours = ours_from(ref)
    gen = torch.Generator().manual_seed(5)
    img_ids = torch.cat([grid_ids(4, 3) * torch.tensor([1, 21, 31, 1]), grid_ids(2, 2, t=10) * 30])
    txt_ids = text_ids(9) * 60
    img = torch.randn(2, img_ids.shape[0], 4, generator=gen)
    txt = torch.randn(2, 9, 32, generator=gen)
    t, g = torch.tensor([0.91, 0.13]), torch.tensor([4.0, 2.5])
    with torch.no_grad():
        expected = ref(img, txt, t, img_ids, txt_ids, g, return_dict=False)[0]
        got = ours(img, txt, t, img_ids, txt_ids, g)
    assert img_ids[:, 1:3].max() >= 63 and txt_ids[:, 3].max() >= 480
    assert (got - expected).abs().max() <= TOL


def test_prepared_inputs_give_the_same_step_and_are_checked():
    """The text projection and RoPE tables computed once per request give every step the same numbers."""
    ours = ours_from(tiny_diffusers_transformer())
    x = inputs(2, refs=1)
    args = (x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"])
    with torch.no_grad():
        prepared = ours.prepare(x["txt"], x["img_ids"], x["txt_ids"])
        assert torch.equal(ours(*args, prepared=prepared), ours(*args))
        other = ours.prepare(x["txt"], x["img_ids"][:12], x["txt_ids"])  # without the reference's ids
        with pytest.raises(ValueError, match="prepare them with this step's text and ids"):
            ours(*args, prepared=other)


def test_row_groups_give_each_group_its_solo_rows():
    """Two requests in one forward: each group's timestep embedding and modulation are its solo ones."""
    ours = ours_from(tiny_diffusers_transformer())
    x = inputs(3, refs=1)
    x["timestep"] = torch.full((3,), 0.4)
    with torch.no_grad():
        both = ours(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], row_groups=[1, 2])
        for rows in (slice(0, 1), slice(1, 3)):
            alone = ours(x["img"][rows], x["txt"][rows], x["timestep"][rows], x["img_ids"], x["txt_ids"])
            # bit for bit where the matrix products' kernels treat rows alike, which depends on the CPU and
            # the row count (MKL rounds 7-token rows by row count; 4, 12, 18, 25 and 36 alike, AVX-512)
            assert (both[rows] - alone).abs().max() <= 1e-6 * alone.abs().max()
        with pytest.raises(ValueError, match="must add up to the batch, 3"):
            ours(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], row_groups=[1, 1])


def test_the_last_layer_computes_only_the_rows_returned():
    """With references after the noisy tokens, `out_tokens` returns the noisy tokens' velocity, and the last
    layer computes the queries, MLP and output projection of those rows only: the same as the whole layer's
    rows (within 1e-6 of them: the products see fewer rows; bit for bit where the CPU's kernels round rows
    alike) and within 1e-5 of diffusers. A hook on the fused projection (an unfused LoRA) still applies."""
    ref = tiny_diffusers_transformer()
    ours = ours_from(ref)
    x = inputs(2, refs=2)
    args = (x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"])
    block = ours.single_transformer_blocks[-1]
    seen: list[int] = []
    with torch.no_grad():
        expected = diffusers_call(ref, x)[0][:, :12]
        got = ours(*args, out_tokens=12)
        assert got.shape == (2, 12, 4) and (got - expected).abs().max() <= TOL
        with whole_last_layer(ours, seen):
            full = ours(*args, out_tokens=12)
        assert seen == [7 + 12 + 2 * 6]  # the last layer saw text, noisy and reference tokens
        assert (got - full).abs().max() <= 1e-6 * full.abs().max()

        handle = block.attn.to_qkv_mlp_proj.register_forward_hook(lambda m, i, out: out * 1.5)
        hooked = ours(*args, out_tokens=12)
        with whole_last_layer(ours):
            hooked_full = ours(*args, out_tokens=12)
        handle.remove()
        assert (hooked - got).abs().max() > 1e-3  # the hook changed the result...
        assert (hooked - hooked_full).abs().max() <= 1e-6 * hooked_full.abs().max()  # ...as it does whole
        for bad in (0, 13 + 12):
            with pytest.raises(ValueError, match=r"out_tokens must be in 1\.\.24 \(the image-stream"):
                ours(*args, out_tokens=bad)
