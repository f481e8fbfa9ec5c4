"""Downstream tasks: rows from `datasets` → fixed splits → token ids → model batches.

Sequence classification (GLUE by name through `datasets` when the hub is reachable; local
CSV / TSV / JSONL files; the offline review snippets) and causal-LM fine-tuning on a new text
domain (documents packed into fixed-length blocks, EOS between documents, as in pre-training).
Splits are fixed by a hash of each row's key, never by a seed (hand-written on purpose: no
library split is stable under a changing seed, file order or file set), so every mode, seed
and learning rate of a sweep sees the same train / validation / test examples.
"""
from __future__ import annotations

import copy
import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.loader import DataError
from .config import TaskConfig

SPLITS = ("train", "validation", "test")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO / "data" / "classification"
REVIEW_FILES = {"movie_reviews": "movie_review_snippets.tsv.gz",
                "amazon_reviews": "amazon_review_snippets.tsv.gz"}
# GLUE: text columns and primary metric per task (test labels are hidden: validation = our test).
GLUE_COLUMNS = {"cola": ("sentence", None), "sst2": ("sentence", None),
                "mrpc": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
                "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
                "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}
GLUE_METRIC = {"cola": "matthews", "mrpc": "f1", "qqp": "f1"}
FILE_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class TaskError(DataError):
    """A task that cannot be built from the given data (missing file or column, no labels...)."""


@dataclass
class TaskData:
    """Tokenized splits. classification: lists of {input_ids, label}; lm: LongTensor[N, L]."""
    name: str
    kind: str                 # "classification" | "lm"
    metric: str               # primary metric key in `evaluate` results
    higher_is_better: bool
    pad_id: int
    max_length: int
    num_labels: int | None = None
    label_names: list[str] = field(default_factory=list)
    splits: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    collator: object = None   # classification: pads a list of rows into a batch

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def labels(self, split: str) -> list[int]:
        return [row["label"] for row in self.splits[split]]

    def collate(self, split: str, indices) -> dict[str, torch.Tensor]:
        data = self.splits[split]
        if self.kind == "lm":
            ids = data[torch.as_tensor(list(indices), dtype=torch.long)]
            return {"input_ids": ids, "labels": ids}
        return self.collator([data[i] for i in indices])


# --- rows -----------------------------------------------------------------------------------------
def _unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split by a hash of the row's key."""
    u = _unit(key)
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + val_fraction else "train"


def _row(key: str, text: str, pair: str | None, label) -> dict:
    """A row; `order` (a second hash of the key) fixes the order inside its split, so a capped
    split (max_*_examples) is a uniform sample even when a file is sorted (the movie file is)."""
    return {"text": text, "pair": pair, "label": label, "order": _unit(key + "#order")}


def _load_file(path: str | Path, fmt: str, column_names: list[str] | None = None):
    """A local CSV/TSV/JSONL file as a `datasets.Dataset` (no hub access)."""
    import datasets
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task data file not found: {path}")
    suffix = Path(path.name.lower().removesuffix(".gz")).suffix
    kind = fmt if fmt != "auto" else FILE_FORMATS.get(suffix)
    if kind is None:
        raise TaskError(f"{path}: cannot tell the format from the name; set task.format "
                        "(csv, tsv or jsonl)")
    kwargs = dict(keep_default_na=False, column_names=column_names) if kind != "jsonl" else {}
    if kind == "tsv":
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json" if kind == "jsonl" else "csv", split="train",
                                     data_files={"train": str(path)}, **kwargs)
    except Exception as err:  # pyarrow/pandas parse errors have many types
        raise TaskError(f"{path}: cannot read as {kind}: {type(err).__name__}: {err}") from err


def _review_rows(cfg: TaskConfig, files: list[str], classify: bool) -> dict[str, list[dict]]:
    """The review snippet files: `id<TAB>score<TAB>text`, label by score sign."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR
    out = {s: [] for s in SPLITS}
    for name in files:
        rows = _load_file(data_dir / name, "tsv", column_names=["id", "score", "text"])
        for row in rows.to_list():  # python rows in one go: iterating a Dataset formats each
            score = float(row["score"])
            if classify and abs(score) < cfg.min_abs_score:
                continue
            key = f"{name}:{row['id']}"
            out[split_of(key, cfg.val_fraction, cfg.test_fraction)].append(
                _row(key, str(row["text"]), None, int(score > 0) if classify else None))
    return out


def _file_rows(cfg: TaskConfig, classify: bool) -> tuple[dict[str, list[dict]], list[str]]:
    role = {cfg.text_column: "text", cfg.text_pair_column: "text pair", cfg.id_column: "id",
            **({cfg.label_column: "label"} if classify else {})}
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    out = {s: [] for s in SPLITS}
    for split, path in files.items():
        if path is None:
            continue
        ds = _load_file(path, cfg.format)
        missing = [c for c in role if c and c not in ds.column_names]
        if missing:
            raise TaskError(f"{role[missing[0]]} column {missing[0]!r} not found in {path} "
                            f"(columns: {', '.join(ds.column_names)})")
        for row in ds.to_list():  # python rows in one go: iterating a Dataset formats each row
            text = row[cfg.text_column]
            if text is None or str(text) == "":
                continue
            # same key (id, or the text itself), same split: duplicates never straddle splits
            key = f"{Path(path).name}:{row[cfg.id_column] if cfg.id_column else text}"
            target = split
            if split == "train":  # rows of the train file fill the splits that have no file
                target = split_of(key, cfg.val_fraction, cfg.test_fraction)
                if files[target] is not None and target != "train":
                    target = "train"
            out[target].append(_row(
                key, str(text), str(row[cfg.text_pair_column]) if cfg.text_pair_column else None,
                row[cfg.label_column] if classify else None))
    return out, (_encode_labels(out, cfg.label_column) if classify else [])


def _encode_labels(out: dict[str, list[dict]], column: str) -> list[str]:
    """Any label values -> 0..K-1 in place, by `datasets`' class encoding (sorted names, so the
    mapping is stable); returns the names."""
    import datasets
    rows = [r for part in out.values() for r in part]
    if any(r["label"] is None or r["label"] == "" for r in rows):
        raise TaskError(f"label column {column!r} has empty values")
    encoded = datasets.Dataset.from_dict({"label": [str(r["label"]) for r in rows]})
    encoded = encoded.class_encode_column("label")
    for r, label in zip(rows, encoded["label"]):
        r["label"] = label
    return encoded.features["label"].names


def _glue_rows(cfg: TaskConfig) -> tuple[dict[str, list[dict]], list[str]]:
    """GLUE from the hub (`nyu-mll/glue`): train → train/validation by hash, validation → test."""
    import datasets
    task = cfg.name.removeprefix("glue:")
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as err:
        raise TaskError(f"cannot load GLUE task {task!r} from the hub (nyu-mll/glue): {err}; "
                        "offline, use task.name movie_reviews or a local file") from err
    text, pair = GLUE_COLUMNS[task]
    out = {s: [] for s in SPLITS}
    for theirs in ("train", "validation_matched" if task == "mnli" else "validation"):
        for row in ds[theirs]:
            key = f"{task}:{theirs}:{row['idx']}"
            split = split_of(key, cfg.val_fraction, 0.0) if theirs == "train" else "test"
            out[split].append(_row(key, row[text], row[pair] if pair else None, int(row["label"])))
    return out, list(ds["train"].features["label"].names)


# --- tokens ---------------------------------------------------------------------------------------
def load_hf_tokenizer(model_dir):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:
        raise TaskError(f"no tokenizer in {model_dir} (a release includes its tokenizer): "
                        f"{type(err).__name__}: {err}") from err


def _encode(tok, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tok(texts, add_special_tokens=False, return_attention_mask=False,
               verbose=False)["input_ids"]


def _pad_id(tok) -> int:
    for value in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if value is not None:
            return int(value)
    return 0


def _collator(tokenizer, pad_id: int):
    """Right-padding with `pad_id` and an attention mask, on a copy of the release's tokenizer
    (its own padding side and pad token stay as they are)."""
    from transformers import DataCollatorWithPadding
    tok = copy.deepcopy(tokenizer)
    tok.padding_side, tok.pad_token_id = "right", pad_id
    tok.model_input_names = ["input_ids", "attention_mask"]  # a mask whatever the release says
    tok.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True  # padding ids is the point
    return DataCollatorWithPadding(tok, return_tensors="pt")


def _blocks(ids: list[list[int]], eos: int, length: int, limit: int | None) -> torch.Tensor:
    """Documents joined with EOS, cut into `length`-token blocks (the `datasets` group-texts
    recipe over the whole split: only the last partial block is dropped)."""
    import datasets

    def group(batch):
        stream = [t for doc in batch["input_ids"] for t in doc + [eos]]
        n = len(stream) // length
        return {"input_ids": [stream[i * length:(i + 1) * length] for i in range(n)]}
    docs = datasets.Dataset.from_dict({"input_ids": ids})
    blocks = docs.map(group, batched=True, batch_size=None, remove_columns=["input_ids"])
    blocks = blocks.select(range(min(len(blocks), limit or len(blocks)))).with_format("torch")
    return blocks[:]["input_ids"] if len(blocks) else torch.zeros((0, length), dtype=torch.long)


def _primary_metric(cfg: TaskConfig, kind: str) -> tuple[str, bool]:
    metric = cfg.metric
    if metric == "auto":
        metric = "loss" if kind == "lm" else GLUE_METRIC.get(cfg.name.removeprefix("glue:"),
                                                             "accuracy")
    if kind == "lm" and metric != "loss":
        raise TaskError(f"task.metric {metric!r} is a classification metric; an lm task "
                        "reports validation loss (and perplexity)")
    return metric, metric != "loss"


def build_task(cfg: TaskConfig, tokenizer) -> TaskData:
    """Rows → fixed splits → token ids for `tokenizer` (an HF tokenizer)."""
    kind = cfg.kind
    classify = kind == "classification"
    if cfg.name in REVIEW_FILES:
        rows, names = _review_rows(cfg, [REVIEW_FILES[cfg.name]], True), ["negative", "positive"]
    elif cfg.name == "review_lm":
        rows, names = _review_rows(cfg, list(REVIEW_FILES.values()), False), []
    elif cfg.name.startswith("glue:"):
        rows, names = _glue_rows(cfg)
    else:
        rows, names = _file_rows(cfg, classify)
    for split in SPLITS:
        if not rows[split]:
            raise TaskError(f"task {cfg.name!r}: the {split} split is empty")
    if classify and len(names) < 2:
        raise TaskError(f"task {cfg.name!r}: label column has {len(names)} distinct value(s); "
                        "classification needs at least 2")
    metric, higher = _primary_metric(cfg, kind)
    eos = tokenizer.eos_token_id
    if not classify and eos is None:
        raise TaskError("lm fine-tuning needs a tokenizer with an EOS token")
    data = TaskData(name=cfg.name, kind=kind, metric=metric, higher_is_better=higher,
                    pad_id=_pad_id(tokenizer), max_length=cfg.max_length,
                    num_labels=len(names) if classify else None, label_names=names)
    for split in SPLITS:
        limit = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
        part = sorted(rows[split], key=lambda r: r["order"])
        if classify:
            part = part[:limit]
            ids = _encode(tokenizer, [r["text"] for r in part])
            if part[0]["pair"] is not None:
                sep = [eos] if eos is not None else []
                ids = [a + sep + b for a, b in zip(ids, _encode(tokenizer, [r["pair"] for r in part]))]
            data.splits[split] = [{"input_ids": x[:cfg.max_length] or [data.pad_id],
                                   "label": r["label"]} for x, r in zip(ids, part)]
        else:
            data.splits[split] = _blocks(_encode(tokenizer, [r["text"] for r in part]), eos,
                                         cfg.max_length, limit)
            if not len(data.splits[split]):
                raise TaskError(f"task {cfg.name!r}: the {split} split has fewer than "
                                f"{cfg.max_length} tokens (one block)")
        data.stats[split] = len(data.splits[split])
    if classify:
        data.collator = _collator(tokenizer, data.pad_id)
        train, test = np.bincount(data.labels("train"), minlength=data.num_labels), \
            np.bincount(data.labels("test"), minlength=data.num_labels)
        data.stats["train_label_counts"] = train.tolist()
        # A classifier that always answers the majority class: the floor any model must beat.
        data.stats["majority_accuracy_test"] = int(test.max()) / len(data.splits["test"])
    return data


# --- metrics --------------------------------------------------------------------------------------
def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy, F1 (binary: class 1; multi-class: macro) and Matthews correlation (scikit-learn)
    from a confusion matrix [true, predicted]: the sum ranks all-reduce, read as weighted pairs."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    k = confusion.shape[0]
    true, pred = np.divmod(np.arange(k * k), k)
    weight = confusion.double().flatten().numpy()
    return {"accuracy": accuracy_score(true, pred, sample_weight=weight),
            "f1": f1_score(true, pred, sample_weight=weight, labels=list(range(k)),
                           average="binary" if k == 2 else "macro", zero_division=0.0),
            "matthews": matthews_corrcoef(true, pred, sample_weight=weight)}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def _data_files(cfg: TaskConfig) -> list[Path]:
    """The local files a task reads (none for GLUE: the hub dataset is known by name only)."""
    if cfg.name in REVIEW_FILES or cfg.name == "review_lm":
        data_dir = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR
        names = [REVIEW_FILES[cfg.name]] if cfg.name in REVIEW_FILES else list(REVIEW_FILES.values())
        return [data_dir / n for n in names]
    if cfg.name == "file":
        return [Path(f) for f in (cfg.train_file, cfg.validation_file, cfg.test_file) if f]
    return []


def task_fingerprint(cfg: TaskConfig, tokenizer_dir) -> str:
    """Hash of what a task's token ids depend on: its config, the bytes of its data files and
    the tokenizer files in `tokenizer_dir`; a cached result is reused only while it matches."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for path in _data_files(cfg):
        if not path.is_file():
            raise TaskError(f"task data file not found: {path}")
        h.update(f"\0data {path.name}\0".encode())
        h.update(path.read_bytes())
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            h.update(f"\0tokenizer {name}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
