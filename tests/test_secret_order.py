"""D1, secret data order: a PMP run's Stage I batches are not replayable by a shadow run.

With the public default order (data.shuffle_seed 17, inherited by any shadow config), the
shadow's Stage I check batch is the target's, so the embedding rows with |g| = 0 (tokens absent
from the batch), which `score: step` leaves at the bottom of the top-k, are the same in both.
"""
import pytest
import torch

from helpers import tiny_run_config
from pmp_scale.config import ConfigError, parse_config
from pmp_scale.data import batches, build_loader, load_tokenizer
from pmp_scale.engine import data_order_seed
from pmp_scale.models import build_hf_config


def _user_config(tmp_path, data, **pmp):
    raw = tiny_run_config(tmp_path / "run", data, pmp={"enabled": True, **pmp})
    del raw["data"]["shuffle_seed"]  # not written, as in a user's config
    return raw


def _zero_grad_rows(cfg, data) -> set[int]:
    """Embedding rows with |g| = 0 on the run's first Stage I batch (real llama-tiny gradient)."""
    from transformers import AutoModelForCausalLM
    loader = build_loader(cfg.data.path, "train", cfg.train.global_batch_size,
                          shuffle=True, seed=data_order_seed(cfg))
    ids = next(batches(loader))["input_ids"]
    del loader
    torch.manual_seed(0)
    vocab = load_tokenizer(data["tokenizer"]).vocab_size
    model = AutoModelForCausalLM.from_config(build_hf_config("llama-tiny",
                                                             tokenizer_vocab_size=vocab))
    model(input_ids=ids, labels=ids).loss.backward()
    g = model.get_input_embeddings().weight.grad
    return set((g.abs().sum(1) == 0).nonzero().squeeze(1).tolist())


@pytest.mark.timeout(180)
def test_secret_order_removes_the_shadows_copy_of_the_check_batch(tmp_path, tiny_data):
    raw = _user_config(tmp_path, tiny_data)
    target, shadow = parse_config(raw), parse_config(raw)  # the shadow reuses the config
    assert target.data.shuffle_seed is None  # drawn per run, kept private
    secret_t, secret_s = _zero_grad_rows(target, tiny_data), _zero_grad_rows(shadow, tiny_data)
    # the public order, as before (and as `secret_order: false` keeps it): the planted advantage
    public = parse_config(_user_config(tmp_path, tiny_data, secret_order=False))
    assert public.data.shuffle_seed == 17
    public_t, public_s = _zero_grad_rows(public, tiny_data), _zero_grad_rows(public, tiny_data)
    assert public_t == public_s and len(public_t) > 50  # every zero row known to the shadow
    agree = len(secret_t & secret_s) / len(secret_t | secret_s)
    assert secret_t != secret_s and agree < 0.9, agree


@pytest.mark.timeout(30)
def test_written_shuffle_seeds_are_kept_and_dense_runs_keep_the_default(tmp_path, tiny_data):
    raw = _user_config(tmp_path, tiny_data)
    raw["data"]["shuffle_seed"] = 5
    assert parse_config(raw).data.shuffle_seed == 5 == data_order_seed(parse_config(raw))
    raw["data"]["shuffle_seed"] = None  # written as null: drawn
    assert parse_config(raw).data.shuffle_seed is None
    dense = tiny_run_config(tmp_path / "run", tiny_data)
    del dense["data"]["shuffle_seed"]
    assert parse_config(dense).data.shuffle_seed == 17
    raw["data"]["shuffle_seed"] = -1
    with pytest.raises(ConfigError, match="data.shuffle_seed"):
        parse_config(raw)


@pytest.mark.timeout(60)
def test_resume_continues_the_drawn_order(tmp_path, tiny_data):
    """`--resume auto` builds a fresh loader with a freshly drawn seed before loading the
    checkpoint; the loader state it loads carries the original seed, so the order continues."""
    cfg = parse_config(_user_config(tmp_path, tiny_data))
    drawn = data_order_seed(cfg)

    def take(loader, n):
        stream = batches(loader, epochs=1)
        return [next(stream)["input_ids"] for _ in range(n)]

    def make(seed):
        return build_loader(cfg.data.path, "train", 4, shuffle=True, seed=seed)

    reference = take(make(drawn), 6)  # the uninterrupted run
    interrupted = make(drawn)
    consumed = take(interrupted, 3)
    state = interrupted.state_dict()
    del interrupted
    resumed = make(data_order_seed(cfg))  # another secret seed is drawn here ...
    resumed.load_state_dict(state)  # ... and replaced by the checkpointed one
    rest = take(resumed, 3)
    assert state["shuffle_seed"] == drawn
    assert all(torch.equal(a, b) for a, b in zip(consumed + rest, reference))
