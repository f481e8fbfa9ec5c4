"""Hugging Face models under ZeRO-3: built or loaded straight into partitions."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def hf_zero3(ds_config: dict):
    """transformers builds and loads under zero.Init while this is active."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (a weakref is held by transformers)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def no_hf_init():
    """transformers' context that skips `post_init`'s weight initialisation (moved in v5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
