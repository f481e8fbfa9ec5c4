"""A tokenizer whose files were not read as a tokenizer (transformers 5 turns the GPT-2
vocab_file=/merges_file= arguments into a 1-token vocabulary that encodes every text to []) is
refused when it is loaded, with one line, before any data is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO
from pmp_scale.data import DataError, load_tokenizer

GPT2 = REPO / "data" / "tokenizers" / "gpt2-bpe"
LLAMA_SPM = REPO / "data" / "tokenizers" / "llama-spm-32k" / "tokenizer.model"


def _word_level_dir(path, vocab_size: int, erase_text: bool):
    """A real tokenizer.json directory (tokenizers library): a word-level vocabulary with
    `vocab_size` entries; `erase_text` adds a normalizer that deletes every character."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if erase_text:
        tok.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(str(path))
    return path


@pytest.mark.timeout(120)
def test_the_shipped_tokenizers_pass(tmp_path):
    gpt2 = load_tokenizer(GPT2)
    assert (gpt2.vocab_size, gpt2.encode("Hello world")) == (50257, [15496, 995])
    llama = load_tokenizer(LLAMA_SPM)
    llama.save_hf(tmp_path / "hf")  # the release's copy is checked as it is written
    assert load_tokenizer(tmp_path / "hf").encode("Hello world") == llama.encode("Hello world")


@pytest.mark.timeout(120)
def test_a_tiny_gpt2_vocabulary_is_refused(tmp_path):
    """vocab.json + merges.txt that hold 3 tokens: the shape of transformers 5's misreading."""
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(DataError, match=r"has 3 tokens \(fewer than 256\)") as err:
        load_tokenizer(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.timeout(120)
def test_a_tokenizer_that_encodes_text_to_nothing_is_refused(tmp_path):
    ok = load_tokenizer(_word_level_dir(tmp_path / "ok", 300, erase_text=False))
    assert ok.vocab_size == 300 and ok.encode("w1 w2") == [3, 4]  # the control
    with pytest.raises(DataError, match="to no tokens") as err:
        load_tokenizer(_word_level_dir(tmp_path / "erased", 300, erase_text=True))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"has 20 tokens"):
        load_tokenizer(_word_level_dir(tmp_path / "small", 20, erase_text=False))


@pytest.mark.timeout(300)
def test_prepare_data_stops_at_once_with_one_line(tmp_path):
    """The CLI: exit 2, one `error:` line naming the tokenizer, no output directory."""
    broken = _word_level_dir(tmp_path / "erased", 300, erase_text=True)
    out = tmp_path / "mds"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input",
         str(REPO / "data" / "corpus" / "persuasion.txt.gz"), "--tokenizer", str(broken),
         "--out", str(out), "--seq-len", "64"],
        capture_output=True, text=True, timeout=280, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: tokenizer ") \
        and "to no tokens" in lines[0], proc.stderr
    assert not out.exists()
