"""LoRA and LoKr adapters for the FLUX.2 transformer: every trainer's file layout read into one form, applied
beside the base weights (which stay untouched) or fused into them and restored bit for bit, and strict
about what they match.

Layouts read, detected from the keys (the FLUX.2 layouts diffusers 0.42.1 reads, with the same result):

  diffusers / PEFT  transformer.<module>.lora_A.weight / .lora_B.weight, scaled by the file's
                    "lora_adapter_metadata" (lora_alpha / r, rank_pattern, alpha_pattern, use_rslora) or 1;
                    base_model.model.<module> (PEFT's own files)
  BFL / ai-toolkit  diffusion_model.<BFL module>.lora_A / .lora_B, BFL names (a fused qkv's B split in three
                    rows, A shared) or diffusers names
  kohya             lora_unet_<BFL module, dots as underscores>.lora_down / .lora_up / .alpha, scaled by
                    alpha / rank
  LoKr              lycoris_<module, dots as underscores>.lokr_* (LyCORIS), diffusion_model.<BFL
                    module>.lokr_* (ai-toolkit; the delta of a fused qkv is split by rows), <module>.lokr_*
                    (SimpleTuner) and transformer.<module>.lokr_* (PEFT); delta = kron(w1, w2) with w = w
                    or w_a @ w_b, scaled by alpha / rank where a factor is rank-decomposed (LyCORIS' rule)

Where fluxforge differs from diffusers, it is because diffusers silently loads something else:
  * a file with keys that match nothing, or only some keys, is an error here (diffusers warns, or loads
    nothing): the error says how many keys matched, shows the ones that did not, and guesses the layout and
    the model the file was made for;
  * diffusion_model.* files with lora_down / lora_up are read with kohya's alpha / rank scaling (diffusers
    takes them for kohya files and loads no key of them); .alpha keys beside lora_A / lora_B scale by
    alpha / rank (diffusers refuses the file);
  * the final layer's modulation in BFL layout (final_layer.adaLN_modulation.1) stores (shift; scale) and
    the model (scale; shift): its LoRA rows are swapped as the base weights are (diffusers does not);
  * DoRA (dora_scale keys) is refused, not dropped with a warning.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxforge.bfl import transformer_source
from fluxforge.cache import content_hash
from fluxforge.checkpoint import Tensors, read_metadata
from fluxforge.errors import CheckpointError

_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha|"
    r"lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|dora_scale)$"
)
_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
_UNDERSCORED = ("lora_unet_", "lycoris_")  # module paths with dots written as underscores
_SHOWN = 8  # unmatched keys quoted in an error
Scales = Mapping[str, float]


class LoraError(CheckpointError):
    """A LoRA file that does not fit the model: what matched, what did not, and what the file looks like."""


# ---------------------------------------------------------------------------------------------------------
# One change to a weight


@dataclass(frozen=True)
class LowRank:
    """delta W = up @ down x scale, for one Linear: down [r, in], up [out, r]."""

    down: Tensor
    up: Tensor
    scale: float

    def activations(self, x: Tensor, weight: float) -> Tensor:
        # .to: a no-op unless the model moved (offload, pipe.to) after the adapter was loaded
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        return F.linear(F.linear(x, down), up) * (weight * self.scale)  # PEFT's order

    def delta(self) -> Tensor:
        return (self.up @ self.down) * self.scale

    @property
    def nbytes(self) -> int:
        return _nbytes(self.down, self.up)


@dataclass(frozen=True)
class Kronecker:
    """delta W = kron(w1, w2) x scale, each factor whole or as a @ b; `rows` picks this Linear's rows of a
    delta made for a fused projection, `swap` swaps the halves of the rows (BFL's (shift; scale))."""

    w1: tuple[Tensor, ...]
    w2: tuple[Tensor, ...]
    scale: float
    rows: tuple[int, int] | None = None
    swap: bool = False

    def delta(self) -> Tensor:
        w1 = self.w1[0] if len(self.w1) == 1 else self.w1[0] @ self.w1[1]
        w2 = self.w2[0] if len(self.w2) == 1 else self.w2[0] @ self.w2[1]
        delta = torch.kron(w1, w2.contiguous()) * self.scale
        if self.swap:
            delta = torch.cat(delta.chunk(2)[::-1])
        return delta if self.rows is None else delta[self.rows[0] : self.rows[1]]

    def activations(self, x: Tensor, weight: float) -> Tensor:
        delta = self.delta().to(x.device, x.dtype)
        return F.linear(x, delta * weight if weight != 1 else delta)

    @property
    def nbytes(self) -> int:
        return _nbytes(*self.w1, *self.w2)


Change = LowRank | Kronecker


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class LoraAdapter:
    """One file's changes, by the name of the Linear they change (a module of `Flux2Transformer`)."""

    name: str
    source: str  # the file, or "<state dict>"
    layout: str  # "diffusers", "peft", "bfl", "kohya", "lycoris", ...
    kind: str  # "lora" or "lokr"
    changes: dict[str, tuple[Change, ...]]
    digest: str  # of the tensors and the scaling: what the caches key on
    keys: int  # tensors in the file

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for changes in self.changes.values() for c in changes)

    def describe(self) -> dict:
        return {"name": self.name, "layout": self.layout, "kind": self.kind, "modules": len(self.changes)}


# ---------------------------------------------------------------------------------------------------------
# Reading a file


def read_lora(
    source: str | Path | Mapping[str, Tensor],
    model: nn.Module,
    name: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoraAdapter:
    """Read a LoRA / LoKr file (or a state dict) for `model`, every key matched to one of its Linear layers
    with the right shape, or a `LoraError` saying what did not match."""
    where = "<state dict>" if isinstance(source, Mapping) else str(source)
    if isinstance(source, Mapping):
        state = {k: v for k, v in source.items() if isinstance(v, Tensor)}
        meta = dict(metadata or {})
    else:
        state, meta = _load_file(Path(source))
    if not state:
        raise LoraError("the LoRA file holds no tensors", path=where)
    layout = guess_layout(state)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    index = _module_index(model)
    config = _metadata_config(meta, where)
    groups: dict[str, dict[str, Tensor]] = {}
    unmatched: list[str] = []
    for key, tensor in state.items():
        m = _SUFFIX.match(key)
        if m is None:
            unmatched.append(key)
            continue
        groups.setdefault(m["module"], {})[m["part"]] = tensor
    if any("dora_scale" in parts for parts in groups.values()):
        raise LoraError(
            "this is a DoRA file (dora_scale keys): fluxforge applies LoRA and LoKr only, and dropping the "
            "magnitudes (as diffusers does, with a warning) would give another picture",
            path=where,
        )
    changes: dict[str, list[Change]] = {}
    shapes: list[str] = []  # modules of the model whose shape the file's delta does not have
    bad = len(unmatched)
    for module, parts in groups.items():
        targets = index.get(_strip(module))
        keys = [f"{module}.{p}" for p in parts]
        if targets is None:
            unmatched.extend(keys)
            bad += len(keys)
            continue
        try:
            made = _changes(parts, targets, config)
        except _Mismatch as exc:
            shapes.append(f"{module}: {exc}")
            bad += len(keys)
            continue
        for target, change in made:
            changes.setdefault(target, []).append(_to(change, dtype, device))
    if bad:
        total = len(state)
        raise LoraError(
            f"{total - bad} of the {total} keys of this LoRA file match the model's layers; "
            f"{'none do' if bad == total else 'the others do not'} (the first {_SHOWN} of each kind are "
            "listed). "
            f"{_guess_origin(state, model, layout)}",
            path=where,
            unexpected=unmatched[:_SHOWN],
            mismatched=shapes[:_SHOWN],
        )
    kind = "lokr" if any(isinstance(c, Kronecker) for cs in changes.values() for c in cs) else "lora"
    digest = _digest(state, config)
    return LoraAdapter(
        name=name or (Path(where).stem if not isinstance(source, Mapping) else "lora"),
        source=where,
        layout=layout,
        kind=kind,
        changes={k: tuple(v) for k, v in changes.items()},
        digest=digest,
        keys=len(state),
    )


def _load_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise LoraError("no such LoRA file", path=str(path))
    try:
        tensors = Tensors.from_file(path)
        return dict(tensors.read(list(tensors))), read_metadata(path)
    except CheckpointError as exc:
        raise LoraError(str(exc).split("\n")[0], path=str(path)) from None


def _strip(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :]
    for prefix in _UNDERSCORED:
        if module.startswith(prefix):
            return "_:" + module[len(prefix) :]
    return module


# module, its first and end row in the file's delta, halves swapped, and its input width
Target = tuple[str, int, int, bool, int]


def _module_index(model: nn.Module) -> dict[str, list[Target]]:
    """Every name a file may give a Linear of the model, with the rows of the file's delta each one takes:
    the module's own name, its BFL name (fused qkv: three modules), and both with dots as underscores."""
    index: dict[str, list[Target]] = {}
    bfl: dict[str, list[Target]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        out, width = module.out_features, module.in_features
        index[name] = [(name, 0, out, False, width)]
        try:
            source = transformer_source(f"{name}.weight")
        except KeyError:
            continue
        bfl_name = source.key.removesuffix(".weight")
        part = source.part[0] if source.part else 0
        bfl.setdefault(bfl_name, []).append((name, part * out, (part + 1) * out, source.swap_halves, width))
    for bfl_name, targets in bfl.items():
        index.setdefault(bfl_name, sorted(targets, key=lambda t: t[1]))
    for name in list(index):
        index.setdefault("_:" + name.replace(".", "_"), index[name])
    return index


class _Mismatch(ValueError):
    """A file module whose tensors do not make a change of its target layers' shape."""


def _factor(parts: dict[str, Tensor], name: str) -> tuple[Tensor, ...]:
    """One LoKr factor, whole (lokr_w1) or as a @ b (lokr_w1_a, lokr_w1_b); never both, never half."""
    whole, a, b = (parts.get(f"{name}{s}") for s in ("", "_a", "_b"))
    if whole is not None and a is None and b is None:
        return (whole,)
    if whole is None and a is not None and b is not None:
        return (a, b)
    raise _Mismatch(f"{name} must be given whole or as {name}_a and {name}_b")


def _changes(parts: dict[str, Tensor], targets: list[Target], config: dict) -> list[tuple[str, Change]]:
    """The changes one file module makes to each of its target Linears."""
    rows = targets[-1][2]
    if "lora_A.weight" in parts or "lora_down.weight" in parts:
        down = parts.get("lora_A.weight", parts.get("lora_down.weight"))
        up = parts.get("lora_B.weight", parts.get("lora_up.weight"))
        if up is None or down is None or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise _Mismatch("an incomplete or misshapen down / up pair")
        rank = down.shape[0]
        _fits(up.shape[0], down.shape[1], rows, targets)
        if "alpha" in parts or "lora_down.weight" in parts:  # kohya's convention: alpha / rank
            alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
            scale = alpha / rank
        else:
            scale = _config_scale(config, targets[0][0], rank)
        made: list[tuple[str, Change]] = []
        for target, start, end, swap, _ in targets:
            rows_up = up[start:end]
            if swap:
                rows_up = torch.cat(rows_up.chunk(2)[::-1])
            made.append((target, LowRank(down, rows_up.contiguous(), scale)))
        return made
    w1, w2 = _factor(parts, "lokr_w1"), _factor(parts, "lokr_w2")
    if (
        any(t.ndim != 2 for t in (*w1, *w2))
        or (len(w1) == 2 and w1[0].shape[1] != w1[1].shape[0])
        or (len(w2) == 2 and w2[0].shape[1] != w2[1].shape[0])
    ):
        raise _Mismatch("misshapen LoKr factors")
    out1, in1 = (w1[0].shape[0], w1[-1].shape[1])
    out2, in2 = (w2[0].shape[0], w2[-1].shape[1])
    _fits(out1 * out2, in1 * in2, rows, targets)
    decomposed = len(w1) == 2 or len(w2) == 2
    if "alpha" in parts:
        rank = w2[1].shape[0] if len(w2) == 2 else w1[1].shape[0] if len(w1) == 2 else None
        scale = float(parts["alpha"]) / rank if decomposed and rank else 1.0
    else:
        scale = _config_scale(config, targets[0][0], None, lokr=True)
    return [
        (target, Kronecker(w1, w2, scale, None if (start, end) == (0, rows) else (start, end), swap))
        for target, start, end, swap, _ in targets
    ]


def _fits(out: int, inp: int, rows: int, targets: list[Target]) -> None:
    width = targets[0][4]
    if (out, inp) != (rows, width):
        raise _Mismatch(f"a delta of [{out}, {inp}] for a layer of [{rows}, {width}]")


def _metadata_config(meta: Mapping[str, str], where: str) -> dict:
    """The PEFT config diffusers stores under "lora_adapter_metadata", without its "transformer." prefix."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise LoraError(
            "the file's lora_adapter_metadata is not a JSON object, so its scaling is unknown", path=where
        )
    return {k.removeprefix("transformer."): v for k, v in data.items()}


def _pattern(patterns: Mapping[str, float], module: str) -> float | None:
    for key, value in patterns.items():  # PEFT's rule: the pattern matches the end of the module's name
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return None


def _config_scale(config: dict, module: str, rank: int | None, lokr: bool = False) -> float:
    """alpha / r from the file's PEFT config; 1 without one (diffusers' default: alpha = rank)."""
    if not config:
        return 1.0
    r = _pattern(config.get("rank_pattern") or {}, module) or config.get("r") or rank or 1
    alpha = _pattern(config.get("alpha_pattern") or {}, module)
    if alpha is None:
        alpha = config.get("alpha" if lokr else "lora_alpha", r)
    if not lokr and config.get("use_rslora"):
        return alpha / math.sqrt(r)
    return alpha / r


def _to(change: Change, dtype: torch.dtype, device: torch.device) -> Change:
    if isinstance(change, LowRank):
        return LowRank(change.down.to(device, dtype), change.up.to(device, dtype), change.scale)
    return Kronecker(
        tuple(t.to(device, dtype) for t in change.w1),
        tuple(t.to(device, dtype) for t in change.w2),
        change.scale,
        change.rows,
        change.swap,
    )


def _digest(state: Mapping[str, Tensor], config: dict) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(content_hash(state[key]).encode())  # shape included in the key set
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Guessing what a file is, for errors


def guess_layout(state: Mapping[str, Tensor]) -> str:
    keys = list(state)
    lokr = any(".lokr_" in k for k in keys)
    if any(k.startswith("lycoris_") for k in keys):
        return "lycoris"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("lora_te") for k in keys):
        return "kohya (text encoder only)"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "bfl / ai-toolkit" + (" lokr" if lokr else "")
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers" + (" lokr" if lokr else "")
    if any(k.startswith("text_encoder") for k in keys):
        return "diffusers (text encoder only)"
    return "bare module names" + (" lokr" if lokr else "")


_FLUX1_MARKS = ("img_mod.lin", "txt_mod.lin", "modulation.lin", "vector_in", "norm1.linear", "norm1_context",
                "proj_mlp", "ff.net.0", "ff_context.net", "norm.linear", "img_mod_lin", "txt_mod_lin",
                "modulation_lin", "proj_mlp")  # fmt: skip


def _guess_origin(state: Mapping[str, Tensor], model: nn.Module, layout: str) -> str:
    """A sentence on what the file was made for: its layout, and FLUX.1 or the FLUX.2 size its shapes give."""
    keys = list(state)
    text = any(k.startswith(("lora_te", "text_encoder", "te_", "lora_te1")) for k in keys)
    words = [f"The keys look like the {layout} layout."]
    if any(mark in k for k in keys for mark in _FLUX1_MARKS):
        words.append("The layer names are FLUX.1's (per-block modulation, proj_mlp / ff.net): this LoRA was "
                     "made for FLUX.1, not FLUX.2, and cannot be used with it.")  # fmt: skip
    elif text and not any(k.startswith(("lora_unet_", "transformer.", "diffusion_model.")) for k in keys):
        words.append("They change the text encoder only: fluxforge, as diffusers for FLUX.2, applies "
                     "LoRA to the transformer.")  # fmt: skip
    width = _file_width(state)
    have = getattr(getattr(model, "config", None), "inner_dim", None)
    if width and have and width != have:
        words.append(f"Its layers are {width} wide and this model's are {have}: it was made for "
                     f"{_MODEL_BY_WIDTH.get(width, f'a model of width {width}')}.")  # fmt: skip
    return " ".join(words)


_MODEL_BY_WIDTH = {3072: "FLUX.2 [klein] 4B (or FLUX.1)", 4096: "FLUX.2 [klein] 9B", 6144: "FLUX.2 [dev]"}


def _file_width(state: Mapping[str, Tensor]) -> int | None:
    """The model width a file was made for: the most common input width of its down / A matrices."""
    widths = Counter(
        v.shape[1]
        for k, v in state.items()
        if v.ndim == 2 and (k.endswith(("lora_A.weight", "lora_down.weight")))
    )
    return widths.most_common(1)[0][0] if widths else None


# ---------------------------------------------------------------------------------------------------------
# Applying adapters to a model


class LoraSet:
    """The adapters loaded into one model: which are active at what scale, applied by forward hooks beside
    the untouched base weights, or fused into the weights (the originals kept, and restored exactly)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.loaded: dict[str, LoraAdapter] = {}
        self.active: dict[str, float] = {}  # the adapters runs use unless they ask for others, in load order
        self.scales: dict[str, float] = {}  # what the hooks apply now: `active`, or what a run asked for
        self.fused: dict[str, float] = {}  # what the weights hold now
        self._originals: dict[str, Tensor] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._modules = dict(model.named_modules())
        self._cond = threading.Condition()
        self._users = 0  # runs using the adapters as they are now

    # -- loading ---------------------------------------------------------------------------------------

    def add(self, adapter: LoraAdapter, scale: float = 1.0, active: bool = True) -> None:
        if adapter.name in self.loaded:
            raise ValueError(
                f"a LoRA named {adapter.name!r} is loaded already; give this one another name= or unload "
                f"that one first (loaded: {', '.join(self.loaded)})"
            )
        check_scale(scale, adapter.name)
        with self._exclusive():
            if active and self.fused:
                raise ValueError(
                    f"the LoRAs {_names(self.fused)} are fused into the weights; unfuse them before loading "
                    f"{adapter.name!r} as an active one"
                )
            self.loaded[adapter.name] = adapter
            for module in adapter.changes:
                if module not in self._hooks:
                    self._hooks[module] = self._modules[module].register_forward_hook(self._hook(module))
            if active:
                self.active[adapter.name] = float(scale)
                self._switch(self._ordered(self.active))

    def remove(self, name: str | None = None) -> None:
        """Unload one adapter (None: all); fused ones are unfused first."""
        names = list(self.loaded) if name is None else [self._known(name)]
        with self._exclusive():
            if self.fused and any(n in self.fused for n in names):
                self._unfuse()
            for n in names:
                del self.loaded[n]
                self.active.pop(n, None)
                self.scales.pop(n, None)
            wanted = {m for a in self.loaded.values() for m in a.changes}
            for module in [m for m in self._hooks if m not in wanted]:
                self._hooks.pop(module).remove()

    # -- which are active ------------------------------------------------------------------------------

    def activate(self, scales: Scales) -> None:
        """Exactly these adapters, at these scales (an empty mapping: none)."""
        wanted = self._checked(scales)
        with self._exclusive():
            self._switch(wanted)
            self.active = wanted

    def key(self) -> tuple:
        """What the adapters do to the model now, for cache keys: digests and scales, fused or not."""
        return tuple((self.loaded[n].digest, s) for n, s in self.scales.items() if s != 0)

    @contextmanager
    def applied(self, scales: Scales | None) -> Iterator[None]:
        """Run with these adapters (None: the active ones). Runs that want the same adapters share them; one
        that wants others waits for those runs to end. A run's choice does not outlast it: the next run
        without one gets the active adapters again."""
        wanted = None if scales is None else self._checked(scales)
        with self._cond:
            while self._users and (self.active if wanted is None else wanted) != self.scales:
                self._cond.wait()
            self._switch(self.active if wanted is None else wanted)
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    # -- fusing ----------------------------------------------------------------------------------------

    def fuse(self) -> None:
        """Add the active adapters' deltas into the weights (as fast as the base model); the weights they
        change are kept, so that `unfuse` restores them bit for bit."""
        with self._exclusive():
            if self.fused:
                self._unfuse()
            self.scales = dict(self.active)
            for name, scale in self.scales.items():
                for module, changes in self.loaded[name].changes.items():
                    weight = self._modules[module].weight
                    if module not in self._originals:
                        self._originals[module] = weight.detach().clone()
                    with torch.no_grad():
                        for change in changes:
                            weight.add_((change.delta() * scale).to(weight.device, weight.dtype))
            self.fused = dict(self.scales)

    def unfuse(self) -> None:
        with self._exclusive():
            self._unfuse()

    def _unfuse(self) -> None:
        with torch.no_grad():
            for module, original in self._originals.items():
                self._modules[module].weight.copy_(original)
        self._originals.clear()
        self.fused = {}

    # -- inside ----------------------------------------------------------------------------------------

    def _hook(self, module: str):
        def hook(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if self.fused or not self.scales:
                return output
            x = inputs[0]
            for name, scale in self.scales.items():
                for change in self.loaded[name].changes.get(module, ()):
                    if scale != 0:
                        output = output + change.activations(x, scale)
            return output

        return hook

    def _switch(self, wanted: dict[str, float]) -> None:
        if self.fused and wanted != self.fused:
            raise ValueError(
                f"the LoRAs {_names(self.fused)} are fused into the weights; unfuse them before running "
                f"with {_names(wanted) or 'no LoRA'}"
            )
        self.scales = dict(wanted)

    def _checked(self, scales: Scales) -> dict[str, float]:
        if not isinstance(scales, Mapping):
            raise TypeError(f"loras: a mapping of LoRA name -> scale, got {type(scales).__name__}")
        out = {}
        for name, scale in scales.items():
            self._known(name)
            check_scale(scale, name)
            out[name] = float(scale)
        return self._ordered(out)

    def _ordered(self, scales: Scales) -> dict[str, float]:
        return {n: scales[n] for n in self.loaded if n in scales}  # load order: the order of the sums

    def _known(self, name: str) -> str:
        if name not in self.loaded:
            loaded = ", ".join(map(repr, self.loaded)) or "none"
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return name

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._users:
                self._cond.wait()
            yield


def check_scale(scale: object, name: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"loras: the scale of {name!r} must be a finite number, got {scale!r}")


def _names(scales: Scales) -> str:
    return ", ".join(f"{n} ({s:g})" for n, s in scales.items())
