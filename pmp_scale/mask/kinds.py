"""Layer groups of parameters, from their HF names: mask density telemetry and secrecy reports."""
from __future__ import annotations

import re

# First match wins.
KINDS = [("embedding", r"embed|wte|wpe"), ("lm_head", r"lm_head"), ("norm", r"norm|ln_"),
         ("attention", r"attn|q_proj|k_proj|v_proj|o_proj"), ("mlp", r"mlp|proj|fc")]
NAMES = [k for k, _ in KINDS] + ["other"]


def layer_kind(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")
