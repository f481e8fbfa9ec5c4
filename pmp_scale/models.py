"""Model presets and construction under ZeRO-3 with an exact, world-size-invariant init.

Why the init pass: under `deepspeed.zero.Init` the parameters are partitioned as soon as each
module is built, so HF's `_init_weights` runs on empty tensors and the model keeps PyTorch's
default init (embeddings std 1.0 instead of 0.02). We therefore re-run HF's init one module at a
time on full-size fp32 stand-ins, from a freshly seeded generator (`seeded_init`). The result
depends on the seed alone, not on the world size — PMP freezes weights at exactly θ(0).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .ds_internals import full_shape
from .errors import UserError

# vocab_size None = taken from the tokenizer the data was prepared with.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=176,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, vocab_size=None),
    "llama-demo": dict(model_type="llama", hidden_size=256, intermediate_size=688,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                       max_position_embeddings=1024, vocab_size=None),
    "gpt2-tiny": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512,
                      vocab_size=None),
    "gpt2-124m": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                      vocab_size=50257),
    "gpt2-1.5b": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_positions=1024,
                      vocab_size=50257),
    # TinyLlama-1.1B shape.
    "llama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=2048, vocab_size=32000),
    # OpenLLaMA-3B shape.
    "llama-3b": dict(model_type="llama", hidden_size=3200, intermediate_size=8640,
                     num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=2048, vocab_size=32000),
    # Llama-2-7B shape.
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=4096, vocab_size=32000),
}
# Pre-training settings common to every preset: no dropout (deterministic, modern practice),
# untied Llama embeddings (so the mask of one never constrains the other), no KV cache.
_COMMON = {
    "llama": dict(tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                  attention_dropout=0.0, use_cache=False, initializer_range=0.02),
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                 initializer_range=0.02),
}


class ModelConfigError(UserError, ValueError):
    """A preset / vocabulary combination that cannot be built."""


def build_hf_config(preset: str, overrides: dict[str, Any] | None = None,
                    tokenizer_vocab_size: int | None = None) -> PretrainedConfig:
    """Transformers config for `preset`; the vocabulary must cover the tokenizer's ids."""
    if preset not in PRESETS:
        raise ModelConfigError(f"model.preset {preset!r} is unknown; choose one of "
                               f"{', '.join(PRESETS)}")
    fields = dict(PRESETS[preset])
    model_type = fields.pop("model_type")
    fields.update(_COMMON[model_type])
    fields.update(overrides or {})
    if fields.get("vocab_size") is None:
        if tokenizer_vocab_size is None:
            raise ModelConfigError(f"preset {preset!r} takes its vocab_size from the tokenizer, "
                                   "but none was given")
        fields["vocab_size"] = tokenizer_vocab_size
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > fields["vocab_size"]:
        raise ModelConfigError(
            f"tokenizer/vocab-size mismatch: the data's tokenizer has {tokenizer_vocab_size} ids "
            f"but model vocab_size is {fields['vocab_size']} (preset {preset!r}); use a matching "
            "tokenizer or set model.overrides.vocab_size")
    cfg = AutoConfig.for_model(model_type, **fields)
    return cfg


def count_params(cfg: PretrainedConfig) -> int:
    """Exact parameter count without building the model (meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in _unique_params(model))


def flops_per_token(cfg: PretrainedConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention scores (PaLM appendix B)."""
    layers = cfg.num_hidden_layers
    hidden = cfg.hidden_size
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


def _unique_params(model: torch.nn.Module):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def post_order(module: torch.nn.Module):
    for child in module.children():
        yield from post_order(child)
    yield module


# HF's GPT-2 init rescales a child's `c_proj.weight` from the *parent* module
# (a named_parameters loop), so the parent must see that parameter too.
_INITIALISED_FROM_PARENT = ("c_proj.weight",)


def build_model(cfg: PretrainedConfig, ds_config: dict,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build under zero.Init: no rank ever holds the full model.

    The weights are placeholders until `zero3.init_master` writes θ(0) into the engine's fp32
    master (after `deepspeed.initialize`): drawing θ(0) in the training dtype would make the
    complement of a bf16 run bf16-valued in an fp32 release, which gives the mask away.
    """
    import deepspeed
    # The dtype comes from ds_config's bf16/fp16 flags. Do not pass zero.Init(dtype=...): in
    # DeepSpeed 0.19 an explicit dtype is replaced by bf16 on accelerators without fp16 (CPU),
    # an operator-precedence slip in `Init._set_dtype`.
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def _touched(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """(owner, attribute, parameter) for every parameter `_init_weights(module)` writes."""
    out = [(module, n, p) for n, p in module.named_parameters(recurse=False)]
    for name, p in module.named_parameters():
        if name in _INITIALISED_FROM_PARENT:
            owner_path, _, attr = name.rpartition(".")
            out.append((module.get_submodule(owner_path), attr, p))
    return out


@torch.no_grad()
def seeded_init(model: torch.nn.Module, seed: int, device: str | torch.device = "cpu",
                only: set[str] | None = None):
    """(name, full fp32 θ(0)) for every parameter (or those named in `only`, drawing nothing
    for modules without one): HF's `_init_weights` from `seed`, in fp32.

    Why stand-ins: each module's parameters are swapped for full-size fp32 tensors while HF's
    init runs on it, on every rank with the same seeded generator, so θ(0) is the same fp32
    draw at any world size and any training precision, and no parameter is ever gathered.
    Peak memory: the largest module (plus GPT-2's tied embedding until the head is reached).
    """
    order = list(post_order(model))
    names = {id(p): n for n, p in model.named_parameters()}
    last = {}
    for i, module in enumerate(order):
        for _, _, p in _touched(module):
            last[id(p)] = i
    values: dict[int, torch.Tensor] = {}
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for i, module in enumerate(order):  # children first, as nn.Module.apply (HF's order)
            touched = _touched(module)
            if not touched or (only is not None
                               and not any(names[id(p)] in only for _, _, p in touched)):
                continue
            for owner, attr, p in touched:
                standin = values.setdefault(id(p), torch.full(full_shape(p), float("nan"),
                                                              device=device))
                owner._parameters[attr] = torch.nn.Parameter(standin, requires_grad=False)
            try:
                model._init_weights(module)
            finally:
                for owner, attr, p in touched:
                    owner._parameters[attr] = p
            for _, _, p in touched:
                if last[id(p)] == i and id(p) in values:
                    value = values.pop(id(p))
                    if only is not None and names[id(p)] not in only:
                        continue
                    if torch.isnan(value).any():
                        raise ModelConfigError(f"{names[id(p)]}: HF's _init_weights left it (partly)"
                                               " uninitialised; this architecture needs its own init")
                    yield names[id(p)], value
    finally:
        torch.random.set_rng_state(gen_state)


def is_constant(t: torch.Tensor) -> bool:
    """All elements equal (norm weights = 1, biases = 0): such a tensor's frozen elements would
    sit exactly at a public constant, revealing their mask bit without any seed."""
    flat = t.reshape(-1)
    return bool((flat == flat[0]).all())
