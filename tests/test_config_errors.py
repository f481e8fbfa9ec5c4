"""Bad input fails early with one clear line naming the problem (no process group needed)."""
from __future__ import annotations

import pytest
import yaml

from helpers import REPO, with_overrides
from pmp_scale.config import ConfigError, apply_overrides, load_config, parse_config


def raw_config(**over):
    raw = {"run_dir": "runs/x", "model": {"preset": "llama-tiny"},
           "data": {"path": "data/x", "tokenizer": "tok.model"},
           "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 10},
           "optim": {"lr": 1e-3}}
    return with_overrides(raw, over)


@pytest.mark.parametrize("over, message", [
    ({"train__micro_batchsize": 2}, "train.micro_batchsize: unknown key"),
    ({"optim__lr": "fast"}, "optim.lr"),
    ({"optim__lr": -1.0}, "optim.lr"),
    ({"train__global_batch_size": 7}, "train.global_batch_size (7) must be a multiple of"),
    ({"optim__warmup_steps": 50}, "optim.warmup_steps (50) exceeds train.max_steps (10)"),
    ({"deepspeed": {"train_batch_size": 4}}, "deepspeed.train_batch_size is derived"),
    ({"pmp__mask_ratio": 1.5}, "pmp.mask_ratio"),
    ({"pmp__complement": "thaw"}, "pmp.complement"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_bad_values_name_the_key(over, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw_config(**over))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_size_must_divide_global_batch():
    cfg = parse_config(raw_config(train__global_batch_size=6, train__micro_batch_size=2))
    assert cfg.grad_accum_steps(1) == 3
    assert cfg.grad_accum_steps(3) == 1
    with pytest.raises(ConfigError, match=r"not divisible by world size \(2\) x "
                                          r"train.micro_batch_size \(2\) = 4"):
        cfg.grad_accum_steps(2)


def test_overrides_use_dotted_keys_and_yaml_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config()))
    cfg = load_config(path, ["optim.lr=3e-4", "model.overrides.num_hidden_layers=1",
                             "pmp.exclude=[embed*]"])
    assert cfg.optim.lr == 3e-4
    assert cfg.model.overrides == {"num_hidden_layers": 1}
    assert cfg.pmp.exclude == ["embed*"]
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["optim.lr"])


def test_shipped_configs_are_valid():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def _run_launcher(args, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "launchers" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_user_errors_share_one_base_and_end_in_one_line(monkeypatch, capsys):
    from pmp_scale.checkpoint import CheckpointError
    from pmp_scale.cli import fail_cleanly
    from pmp_scale.data import DataError
    from pmp_scale.errors import UserError
    from pmp_scale.mask.sharded import MaskLayoutError
    for error, builtin in [(ConfigError, ValueError), (DataError, ValueError),
                           (CheckpointError, RuntimeError), (MaskLayoutError, ValueError)]:
        assert issubclass(error, UserError) and issubclass(error, builtin)

    class NewInputError(UserError):
        pass

    @fail_cleanly
    def main():
        raise NewInputError("input X is wrong; fix it")
    monkeypatch.delenv("RANK", raising=False)
    assert main() == 2 and capsys.readouterr().err == "error: input X is wrong; fix it\n"


def test_an_in_process_engine_without_local_rank_is_one_clear_error(monkeypatch):
    """The package does not invent LOCAL_RANK (DeepSpeed reads it from the environment only):
    without a launcher or an entry point setting it, the fine-tuner says what to set."""
    from pmp_scale.zero3 import require_local_rank
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="LOCAL_RANK is not set.*set LOCAL_RANK=0"):
        require_local_rank()
    monkeypatch.setenv("LOCAL_RANK", "0")
    require_local_rank()


def test_launcher_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(train__global_batch_size=7)))
    code, lines = _run_launcher(["--config", str(path)], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: invalid config: train.global_batch_size (7)")


def test_launcher_missing_data_dir(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(data={"path": str(tmp_path / "nope"),
                                                    "tokenizer": "t.model"})))
    code, lines = _run_launcher(["--config", str(path)], capsys)
    assert code == 2 and len(lines) == 1
    assert "data directory not found" in lines[0] and str(tmp_path / "nope") in lines[0]


def test_launcher_tokenizer_other_than_the_datas(tmp_path, capsys, tiny_data):
    path = tmp_path / "run.yaml"
    raw = raw_config(data={"path": tiny_data["data"],
                           "tokenizer": str(REPO / "data" / "tokenizers" / "gpt2-bpe")})
    path.write_text(yaml.safe_dump(raw))
    code, lines = _run_launcher(["--config", str(path)], capsys)
    assert code == 2 and len(lines) == 1
    assert "tokenizer mismatch" in lines[0]


def test_vocab_size_mismatch(tmp_path):
    from pmp_scale.models import ModelConfigError, build_hf_config
    with pytest.raises(ModelConfigError, match="tokenizer/vocab-size mismatch: the data's "
                                               "tokenizer has 50257 ids but model vocab_size "
                                               "is 32000"):
        build_hf_config("llama-1.1b", tokenizer_vocab_size=50257)
    with pytest.raises(ModelConfigError, match="model.preset 'llama-9b' is unknown"):
        build_hf_config("llama-9b")
