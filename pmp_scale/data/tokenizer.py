"""One small interface over SentencePiece and Hugging Face tokenizers.

The rest of the pipeline only needs encode/decode, the id-space size, EOS and a fingerprint
(so a dataset tokenized with one tokenizer is never trained or released with another).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .loader import DataError
from .texts import iter_texts

# Files that define an HF tokenizer; only these enter the fingerprint, so a tokenizer that lives
# in a model directory is not re-fingerprinted when the weights change.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                       "merges.txt", "vocab.txt", "added_tokens.json", "tokenizer_config.json",
                       "special_tokens_map.json")


def _sha256_files(files: list[Path]) -> str:
    """sha256 of the file's bytes (as `sha256sum` prints it); of names + bytes for several."""
    if len(files) == 1:
        return hashlib.sha256(files[0].read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class Tokenizer:
    """Uniform wrapper; build it with `load_tokenizer`.

    `vocab_size` is the size of the id space the model's embedding must cover (for HF tokenizers
    this includes added tokens). Encoding never adds BOS/EOS: packing decides where EOS goes.
    """

    vocab_size: int
    eos_id: int
    bos_id: int | None

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self._files = files

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the defining file(s): equal fingerprints mean identical token ids."""
        return _sha256_files(self._files)

    def save_hf(self, out_dir) -> None:
        """Write files that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        super().__init__(model_file, [model_file])
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self.eos_id < 0:
            raise DataError(f"SentencePiece model has no EOS piece: {model_file}")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save_hf(self, out_dir) -> None:
        """A tokenizer.json with SentencePiece's exact pipeline, loaded as it is written by
        transformers 4 and 5 (`PreTrainedTokenizerFast`, no model-specific class).

        Llama's fast tokenizer supplies the vocabulary and merges (read from a directory
        holding `tokenizer.model`: transformers 5 ignores a bare `vocab_file=`, giving a
        3-token vocabulary). Its text pipeline is then set to SentencePiece's own
        (add_dummy_prefix: always one "▁" before the text, spaces as "▁"): transformers 5's
        Llama class prepends "▁" only when the text does not already start with a space, so
        "  two" would lose a piece. No BOS/EOS on encode: the model saw text that way in
        pre-training. One difference remains: HF parses a literal "</s>" in text as the
        special token, SentencePiece encodes it as characters.
        """
        import shutil
        import tempfile

        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, normalizers
        from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

        with tempfile.TemporaryDirectory(prefix="pmp_spm_") as tmp:
            shutil.copyfile(self.path, Path(tmp) / "tokenizer.model")
            llama = LlamaTokenizerFast.from_pretrained(
                tmp, local_files_only=True, legacy=True, add_prefix_space=True,
                add_bos_token=False, add_eos_token=False, from_slow=True)
        backend = Backend.from_str(llama.backend_tokenizer.to_str())
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        backend.post_processor = None  # no BOS/EOS added
        backend.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0)])
        piece = self._sp.id_to_piece
        special = {"unk_token": piece(self._sp.unk_id()), "eos_token": piece(self.eos_id)}
        if self.bos_id is not None:
            special["bos_token"] = piece(self.bos_id)
        if self._sp.pad_id() >= 0:
            special["pad_token"] = piece(self._sp.pad_id())
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                      # no token_type_ids: a causal LM's generate() refuses them
                                      model_input_names=["input_ids", "attention_mask"],
                                      **special)
        check_usable(HFTokenizer(self.path, tok, self._files), self.path)
        tok.save_pretrained(str(out_dir))


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, hf_tokenizer, files: list[Path]):
        super().__init__(path, files)
        self._tok = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_id = hf_tokenizer.eos_token_id
        self.bos_id = hf_tokenizer.bos_token_id
        if self.eos_id is None:
            raise DataError(f"tokenizer has no eos_token (needed between documents): {path}")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:  # HF fails on an empty batch
            return []
        # verbose=False: whole documents exceed model_max_length by design (they get packed).
        return self._tok(list(texts), add_special_tokens=False, return_attention_mask=False,
                         verbose=False)["input_ids"]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def save_hf(self, out_dir) -> None:
        self._tok.save_pretrained(str(out_dir))

# A real tokenizer has at least the 256 byte-level symbols; fewer, or a text that encodes to
# nothing, means the files were read wrongly (transformers 5 builds a 1-token GPT-2 vocabulary
# from vocab_file=/merges_file= arguments without complaint) and data prepared with it would
# fail far away ("no complete sample"). Checked at load time, with one line.
MIN_VOCAB = 256
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def check_usable(tok: "Tokenizer", path) -> "Tokenizer":
    """`tok` if it is a working tokenizer, else a DataError naming what is wrong."""
    if tok.vocab_size < MIN_VOCAB:
        raise DataError(f"tokenizer {path} has {tok.vocab_size} tokens (fewer than {MIN_VOCAB}): "
                        f"its files were not read as a tokenizer; load it with "
                        f"AutoTokenizer.from_pretrained(dir) or give its tokenizer.json")
    if not tok.encode(PROBE_TEXT):
        raise DataError(f"tokenizer {path} encodes the text {PROBE_TEXT!r} to no tokens: its "
                        f"vocabulary or merges were not loaded")
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a SentencePiece `.model` file, an HF tokenizer directory (offline), or a GPT-2 style
    directory holding only vocab.json + merges.txt."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    if p.is_file():
        if p.suffix != ".model":
            raise DataError(f"expected a SentencePiece .model file or a tokenizer directory: {p}")
        return check_usable(SentencePieceTokenizer(p), p)

    files = [p / name for name in _HF_TOKENIZER_FILES if (p / name).is_file()]
    names = {f.name for f in files}
    if "tokenizer_config.json" in names or "tokenizer.json" in names:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        return check_usable(HFTokenizer(p, tok, files), p)
    if {"vocab.json", "merges.txt"} <= names:
        # from_pretrained, not GPT2TokenizerFast(vocab_file=, merges_file=): transformers 5
        # builds a 1-token vocabulary from those arguments and encodes every text to [].
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(str(p), local_files_only=True)
        return check_usable(HFTokenizer(p, tok, files), p)
    raise DataError(f"no tokenizer in {p}: expected tokenizer.json/tokenizer_config.json "
                     f"(Hugging Face) or vocab.json + merges.txt (GPT-2 BPE)")


def train_sentencepiece(inputs: list[str], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe", max_sentences: int = 2_000_000,
                        num_threads: int | None = None) -> str:
    """Train a Llama-style SentencePiece model on documents from `inputs`; returns the .model path.

    Deterministic, byte for byte: the first `max_sentences` documents in input order. Identity
    normalisation and kept whitespace make the model exactly reproducible by HF's
    LlamaTokenizerFast (see `save_hf`); byte fallback makes every string encodable.
    Ids: unk=0, bos=1, eos=2, pad=3.
    """
    import sentencepiece as spm

    out = Path(model_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_texts(inputs),
            model_prefix=str(out),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=0.9995,  # rarer characters go through byte fallback
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:  # e.g. a vocab_size the text cannot fill
        raise DataError(f"SentencePiece training failed: {str(err).split('] ')[-1]}") from err
    # The trainer records the output path in the model; drop it so that the same inputs and
    # settings give a byte-identical file (and fingerprint) wherever it is written.
    from sentencepiece import sentencepiece_model_pb2

    model_file = Path(f"{out}.model")
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_file.read_bytes())
    proto.trainer_spec.ClearField("model_prefix")
    model_file.write_bytes(proto.SerializeToString())
    return str(model_file)
