"""The study's positive control: a release that computes exactly what the dense release computes
but is known to fine-tune worse at one global learning rate.

Llama blocks are linear in V and in the up projection: scaling v_proj and up_proj by α and
dividing o_proj and down_proj by α leaves every logit unchanged (up to fp32 rounding), while
Adam's steps (about lr per element, whatever the weight's size) become α× too small relative to
the enlarged weights and α× too large relative to the shrunk ones. A fine-tuning grid that
cannot tell this release from its source cannot be trusted to see PMP's subtler effect.
GPT-2's MLP has a GELU between c_fc and c_proj (not homogeneous), so it is refused.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import UserError

SCALED_UP = (".self_attn.v_proj.weight", ".mlp.up_proj.weight")
SCALED_DOWN = (".self_attn.o_proj.weight", ".mlp.down_proj.weight")


class ReparamError(UserError):
    """A release the function-preserving reparameterisation is not defined for."""


def reparam_factor(name: str, alpha: float) -> float:
    if name.endswith(SCALED_UP):
        return alpha
    if name.endswith(SCALED_DOWN):
        return 1.0 / alpha
    return 1.0


def reparameterise(src, out, alpha: float = 10.0) -> Path:
    """Write `out`: the release `src` with v/up × alpha and o/down ÷ alpha (same function).
    Written beside `out` and renamed into place, so `out` is either absent or complete."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ReparamError(f"the reparameterised control is defined for Llama releases only; "
                           f"{src} is {config.get('model_type')!r} (GPT-2's GELU MLP is not "
                           "scale-homogeneous): set controls.reparam_alpha to null")
    if getattr_bias(config):
        raise ReparamError(f"{src}: Llama with attention/MLP biases is not supported by the "
                           "reparameterised control")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    scaled = 0
    for f in sorted(src.iterdir()):
        if f.suffix != ".safetensors":
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
            continue
        tensors = {}
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
            for name in h.keys():
                t, k = h.get_tensor(name), reparam_factor(name, alpha)
                tensors[name] = t if k == 1.0 else (t.float() * k).to(t.dtype)
                scaled += k != 1.0
        save_file(tensors, str(tmp / f.name), metadata=meta)
    if not scaled:
        raise ReparamError(f"{src}: no v/o/up/down projection weights found to reparameterise")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def getattr_bias(config: dict) -> bool:
    return bool(config.get("attention_bias") or config.get("mlp_bias"))
