"""Model presets and construction under ZeRO-3 with an exact, world-size-invariant init.

Why the init pass: under `deepspeed.zero.Init` the parameters are partitioned as soon as each
module is built, so HF's `_init_weights` runs on empty tensors and the model keeps PyTorch's
default init (embeddings std 1.0 instead of 0.02). We therefore re-run HF's init one module at a
time, gathering only that module's parameters on rank 0, from a freshly seeded generator. The
result depends on the seed alone, not on the world size — PMP freezes weights at exactly θ(0).
"""
from __future__ import annotations

from typing import Any

import torch
import deepspeed
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

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


class ModelConfigError(ValueError):
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
# (a named_parameters loop), so the parent must see that parameter gathered too.
_INITIALISED_FROM_PARENT = ("c_proj.weight",)


def build_model(cfg: PretrainedConfig, seed: int, ds_config: dict,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build under zero.Init (no rank ever holds the full model) and apply HF's init from `seed`.

    Must run after `deepspeed.init_distributed`. One module's parameters are gathered at a time,
    so peak memory is the largest module, not the model.
    """
    # The dtype comes from ds_config's bf16/fp16 flags. Do not pass zero.Init(dtype=...): in
    # DeepSpeed 0.19 an explicit dtype is replaced by bf16 on accelerators without fp16 (CPU),
    # an operator-precedence slip in `Init._set_dtype`.
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    init_partitioned(model, seed)
    return model


def init_partitioned(model: torch.nn.Module, seed: int) -> None:
    """HF's `_init_weights` on a model whose parameters ZeRO-3 has already partitioned."""
    rank = torch.distributed.get_rank()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in post_order(model):  # children first, as nn.Module.apply (HF's order)
        params = list(module.parameters(recurse=False))
        params += [p for name, p in module.named_parameters() if name in _INITIALISED_FROM_PARENT]
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    model._init_weights(module)
    torch.random.set_rng_state(gen_state)
