"""Authorized fine-tuning in any PyTorch training loop: updates stay inside the private mask.

    model = AutoModelForCausalLM.from_pretrained(release_dir)
    mask = with_private_mask(model, mask_dir)   # checks mask and model against the release
    ...  # Trainer(..., callbacks=[mask.callback()]), TRL, accelerate, DDP or a plain loop
    mask.assert_complement_intact()

The two hooks of pre-training and launchers/finetune.py (pmp_scale/mask/update.py), here on
ordinary, unpartitioned parameters (one GPU, DDP, accelerate, HF Trainer):

1. A gradient hook on every parameter zeroes the complement of each incoming gradient *before*
   it is accumulated into `.grad`, so gradient accumulation, `clip_grad_norm_`, DDP's all-reduce
   (which reads the accumulated `.grad`) and the optimizer's moments all see the masked gradient.
2. A global step post-hook (`torch.optim.optimizer.register_optimizer_step_post_hook`) writes the
   complement back after every step of any `torch.optim.Optimizer` that holds these parameters.
   This makes the guarantee independent of the optimizer: decoupled weight decay, momentum fed
   by weight decay and Adafactor's factored statistics move frozen elements even with zero
   gradients. Being global, it also covers optimizers created later (HF Trainer creates its
   own inside `train()`) without the user handing them over.

Memory: the mask stays packed (1 bit per element) on the parameter's device and is unpacked per
tensor (per chunk for the restore), with torch ops, when a hook runs: no host sync, no `.item()`
in the hooks (CUDA's masked_scatter checks its sizes asynchronously). The complement's release
values are kept compacted, in the parameter's dtype, on its device (1 - rho of the model, 0.3x
at rho = 0.7): restoring from them needs no per-step snapshot of the model (1x at every step)
and no disk reads, and they are the reference of `assert_complement_intact()`. Both follow the
model when it moves to another device.
Not for ZeRO-3 or FSDP-sharded parameters: use `launchers/finetune.py --set mode=authorized`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.trainer_callback import TrainerCallback

from . import ds_internals
from .chunking import spans
from .mask.artifact import MaskArtifactError, read_artifact
from .mask.bits import unpack_bits
from .release import INDEX_FILE, int_view, release_tensors
from .stream_safetensors import digest_update


class AuthorizationError(ValueError):
    """Fine-tuning that could not stay inside the private mask; the message says why."""


def _spans(numel: int) -> list[tuple[int, int]]:
    """Elements restored or compared at a time (chunking.CHUNK): bounds the int64 prefix sum that
    masked_scatter and masked_select build (8 bytes per element), whatever the embedding's size."""
    return list(spans(numel))


def _keep(packed: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of a packed mask (lo a multiple of 8) as bools: True = trainable."""
    return unpack_bits(packed[lo // 8:(hi + 7) // 8], hi - lo)


@dataclass
class _Entry:
    name: str
    param: torch.nn.Parameter
    packed: torch.Tensor  # uint8[ceil(numel / 8)], numpy.packbits order, on the param's device
    frozen: torch.Tensor  # the complement's release values, compacted, in the param's dtype
    starts: list[int]     # where each chunk of the parameter starts in `frozen`

    def follow(self) -> None:
        """The model moved (Trainer moves it to the GPU after the mask is attached): follow it."""
        device = self.param.device
        if self.packed.device != device:
            self.packed, self.frozen = self.packed.to(device), self.frozen.to(device)

    def chunks(self):
        """(flat parameter slice, its keep bits, its complement's release values) per chunk."""
        self.follow()
        flat, s = self.param.detach().view(-1), self.starts
        for i, (lo, hi) in enumerate(_spans(flat.numel())):
            yield flat[lo:hi], _keep(self.packed, lo, hi), self.frozen[s[i]:s[i + 1]]


def _refuse_unsupported(model) -> None:
    """PEFT adapters and partitioned parameters cannot be made authorized by these hooks."""
    if (getattr(model, "peft_config", None) or getattr(model, "_hf_peft_config_loaded", False)
            or any(type(m).__module__.startswith("peft.") for m in model.modules())):
        raise AuthorizationError(
            "LoRA/PEFT adapters cannot be authorized: a low-rank update BA is dense in the base "
            "weights, so merging it moves the complement; fine-tune the model itself with the mask")
    if any(ds_internals.is_partitioned(p) for p in model.parameters()):
        raise AuthorizationError("ZeRO-3 partitioned parameters: use launchers/finetune.py "
                                 "--set mode=authorized for DeepSpeed ZeRO-3")


def _shape_problem(what: str, mine: dict, theirs: dict, only_shared: bool = False) -> str | None:
    names = set(mine) & set(theirs) if only_shared else set(mine) | set(theirs)
    diff = sorted(n for n in names if mine.get(n) != theirs.get(n))
    if not diff:
        return None
    n = diff[0]
    show = lambda s: list(s[n]) if n in s else "absent"  # noqa: E731
    return (f"{what}: {len(diff)} parameter(s) differ in name or shape, e.g. {n!r}: "
            f"{show(mine)} vs {show(theirs)}")


class PrivateMask:
    """The private mask attached to a model; made by `with_private_mask`."""

    def __init__(self, model, entries: list[_Entry], new_params: list[str], release_dir: Path):
        self.model, self.release_dir, self.new_params = model, release_dir, new_params
        self._entries = entries
        self._ids = {id(e.param) for e in entries}
        self.complement_numel = sum(e.starts[-1] for e in entries)
        self._handles = [e.param.register_hook(self._grad_hook(e))
                         for e in entries if e.param.requires_grad]
        self._handles.append(register_optimizer_step_post_hook(self._after_step))

    def remove(self) -> None:
        """Take the hooks off (the model is no longer kept inside the mask)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @staticmethod
    def _grad_hook(e: _Entry):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            e.follow()
            return torch.where(_keep(e.packed, 0, grad.numel()).view(grad.shape), grad, 0)
        return hook

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for e in self._entries:
            if id(e.param) in stepped:
                if e.param.dtype != e.frozen.dtype:
                    raise AuthorizationError(
                        f"{e.name} is {e.param.dtype} but was {e.frozen.dtype} when the mask was "
                        "attached: convert the model before with_private_mask")
                for flat, keep, frozen in e.chunks():
                    flat.masked_scatter_(~keep, frozen)

    @torch.no_grad()
    def complement_moved(self) -> int:
        """Complement elements whose bits differ from the release now (a host sync: a check)."""
        now = dict(self.model.named_parameters())
        for e in self._entries:
            if now.get(e.name) is not e.param:
                raise AuthorizationError(
                    f"{e.name} was replaced after with_private_mask (resize_token_embeddings?): "
                    "the new tensor is not hooked; attach the mask after changing the model")
        moved = 0
        for e in self._entries:
            if e.param.dtype != e.frozen.dtype:
                return self.complement_numel
            for flat, keep, frozen in e.chunks():
                moved += int((int_view(flat.masked_select(~keep)) != int_view(frozen)).sum())
        return moved

    def assert_complement_intact(self) -> int:
        """Raise AuthorizationError unless every complement element equals the release bit for
        bit; returns the number of complement elements checked."""
        moved = self.complement_moved()
        if moved:
            raise AuthorizationError(f"{moved} of {self.complement_numel} complement elements "
                                     f"moved from the release {self.release_dir}")
        return self.complement_numel

    def check_training(self, model=None, optimizer=None) -> None:
        """What a trainer is about to train is this model, hookable and still intact."""
        elsewhere = ("a copy, or sharded by FSDP/ZeRO-3: use launchers/finetune.py "
                     "--set mode=authorized for sharded training")
        if model is not None:
            _refuse_unsupported(model)
            if not any(id(p) in self._ids for p in model.parameters()):
                raise AuthorizationError("the model being trained does not hold the parameters "
                                         f"passed to with_private_mask ({elsewhere})")
        while optimizer is not None and hasattr(optimizer, "optimizer"):  # accelerate's wrapper
            optimizer = optimizer.optimizer
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise AuthorizationError(f"{type(optimizer).__name__} is not a torch.optim."
                                         "Optimizer: its steps cannot be hooked to restore the "
                                         "complement")
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not held & self._ids and any(e.param.requires_grad for e in self._entries):
                raise AuthorizationError("the optimizer holds none of the masked parameters "
                                         f"({elsewhere})")
        self.assert_complement_intact()

    def callback(self) -> "AuthorizedCallback":
        """A TrainerCallback for transformers.Trainer and TRL's trainers."""
        return AuthorizedCallback(self)


class AuthorizedCallback(TrainerCallback):
    """Checks at the start (the optimizer Trainer made, PEFT, intact complement) and at the end
    of training. The hooks themselves are installed by `with_private_mask`, so they are active
    whether or not a trainer calls back. transformers 4.57 creates the optimizer inside
    `train()` and then passes `model` and `optimizer` (accelerate's wrapper) to
    `on_train_begin`; a version that passed no optimizer would only skip that check."""

    def __init__(self, mask: PrivateMask):
        self.mask = mask

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.mask.check_training(model, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.mask.assert_complement_intact()


def _release_dir(model, release_dir) -> Path:
    if release_dir is None:
        release_dir = getattr(model, "name_or_path", "") or ""
    path = Path(release_dir)
    if not ((path / "model.safetensors").is_file() or (path / INDEX_FILE).is_file()):
        raise AuthorizationError(
            f"{str(path) or 'the model'} is not a release directory (no model.safetensors): "
            "load the model with from_pretrained(release_dir) or pass release_dir=")
    return path


def with_private_mask(model, mask_dir, release_dir=None,
                      allow_unbound: bool = False) -> PrivateMask:
    """Check the private mask against the model and its release, then hook the model so that
    any torch optimizer updates only masked elements.

    `release_dir` defaults to the directory the model was loaded from (`model.name_or_path`).
    Refused with AuthorizationError: PEFT models; a corrupt mask artifact; a mask of other
    names or shapes than the release; a release or model of other shapes; a mask bound to
    another release (sha256), or bound to none unless `allow_unbound`; a model whose complement
    already differs from the release (compared in the model's dtype). Model parameters the
    release does not have (a new classification head) are fully trainable.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    _refuse_unsupported(model)
    release_dir, mask_dir = _release_dir(model, release_dir), Path(mask_dir)
    try:
        packed, meta = read_artifact(mask_dir)
    except MaskArtifactError as e:
        raise AuthorizationError(f"corrupt or unreadable mask: {e}") from e
    params = dict(model.named_parameters())
    mask_shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    problem = _shape_problem(f"mask for another architecture ({mask_dir} vs the model)",
                             mask_shapes, {n: tuple(p.shape) for n, p in params.items()},
                             only_shared=True)
    if problem or not set(mask_shapes) & set(params):
        raise AuthorizationError(problem or f"mask for another architecture: {mask_dir} names "
                                            "none of the model's parameters")
    # One pass over the release: its sha256, its shapes, and the complement compared with it.
    digest, release_shapes, entries, moved = hashlib.sha256(), {}, [], 0
    for name, t in release_tensors(release_dir):
        digest_update(digest, name, t)
        release_shapes[name] = tuple(t.shape)
        p = params.get(name)
        if p is None or mask_shapes.get(name) != tuple(t.shape) or p.shape != t.shape:
            continue  # unused by this model (an LM head under a classifier), or reported below
        bits, ref = packed[name].to(p.device), t.reshape(-1).to(device=p.device, dtype=p.dtype)
        flat, values, starts = p.detach().view(-1), [], [0]
        for lo, hi in _spans(p.numel()):
            frozen = ~_keep(bits, lo, hi)
            now, was = flat[lo:hi].masked_select(frozen), ref[lo:hi].masked_select(frozen)
            moved += int((int_view(now) != int_view(was)).sum())
            values.append(was)
            starts.append(starts[-1] + was.numel())
        entries.append(_Entry(name, p, bits, torch.cat(values), starts))
    problem = _shape_problem(f"mask does not describe the release ({mask_dir} vs {release_dir})",
                             mask_shapes, release_shapes)
    if problem:
        raise AuthorizationError(problem)
    recorded, sha = meta.get("release_sha256"), digest.hexdigest()
    if recorded is None and not allow_unbound:
        raise AuthorizationError(f"{mask_dir / 'mask.json'} records no release_sha256, so it "
                                 f"cannot be checked against {release_dir}: bind it with "
                                 f"tools/release.py --private, or pass allow_unbound=True")
    if recorded is not None and recorded != sha:
        raise AuthorizationError(f"mask belongs to another release: {mask_dir / 'mask.json'} "
                                 f"records release sha256 {recorded[:16]}…, {release_dir} has "
                                 f"{sha[:16]}…")
    if moved:
        total = sum(e.starts[-1] for e in entries)
        raise AuthorizationError(
            f"the model already differs from the release on {moved} of {total} complement "
            "elements (fine-tuned without the mask?): authorized fine-tuning starts from the "
            "release")
    new = [n for n in params if n not in release_shapes]
    return PrivateMask(model, entries, new, release_dir)


__all__ = ["AuthorizationError", "AuthorizedCallback", "PrivateMask", "with_private_mask"]
