"""Downstream tasks: rows from `datasets` → fixed splits → token ids → model batches.

Sequence classification (GLUE by name through `datasets` when the hub is reachable; local
CSV / TSV / JSONL files; the offline review snippets) and causal-LM fine-tuning on a new text
domain (documents packed into fixed-length blocks, EOS between documents, as in pre-training).
Splits are fixed by a hash of each row's key, never by a seed, so every mode, seed and learning
rate of a sweep sees the same train / validation / test examples.
"""
from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

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


class TaskError(DataError):
    """A task that cannot be built from the given data (missing file or column, no labels...)."""


@dataclass
class TaskData:
    """Tokenized splits. classification: lists of (token ids, label); lm: LongTensor[N, L]."""
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

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def collate(self, split: str, indices) -> dict[str, torch.Tensor]:
        data = self.splits[split]
        if self.kind == "lm":
            ids = data[torch.as_tensor(list(indices), dtype=torch.long)]
            return {"input_ids": ids, "labels": ids}
        rows = [data[i] for i in indices]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, :len(ids)] = 1
        labels = torch.tensor([label for _, label in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


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


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in ((".tsv", "tsv"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return kind
    raise TaskError(f"{path}: cannot tell the format from the name; set task.format "
                    "(csv, tsv or jsonl)")


def _load_file(path: str | Path, fmt: str, column_names: list[str] | None = None):
    """A local CSV/TSV/JSONL file as a `datasets.Dataset` (no hub access)."""
    import datasets
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task data file not found: {path}")
    kind = _file_format(path, fmt)
    kwargs = {}
    if kind in ("csv", "tsv"):
        builder = "csv"
        kwargs = dict(keep_default_na=False)
        if kind == "tsv":
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
        if column_names:
            kwargs["column_names"] = column_names
    else:
        builder = "json"
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train",
                                     **kwargs)
    except Exception as err:  # pyarrow/pandas parse errors have many types
        raise TaskError(f"{path}: cannot read as {kind}: {type(err).__name__}: {err}") from err


def _require_columns(ds, columns: list[str | None], where: str, role: dict[str, str]) -> None:
    for col in columns:
        if col is not None and col not in ds.column_names:
            raise TaskError(f"{role[col]} column {col!r} not found in {where} "
                            f"(columns: {', '.join(ds.column_names)})")


def _review_rows(cfg: TaskConfig, files: list[str], classify: bool) -> dict[str, list[dict]]:
    """The review snippet files: `id<TAB>score<TAB>text`, label by score sign."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR
    out = {s: [] for s in SPLITS}
    for name in files:
        ds = _load_file(data_dir / name, "tsv", column_names=["id", "score", "text"])
        for row in ds:
            score = float(row["score"])
            if classify and abs(score) < cfg.min_abs_score:
                continue
            key = f"{name}:{row['id']}"
            out[split_of(key, cfg.val_fraction, cfg.test_fraction)].append(
                _row(key, str(row["text"]), None, int(score > 0) if classify else None))
    return out


def _file_rows(cfg: TaskConfig, classify: bool) -> tuple[dict[str, list[dict]], list[str]]:
    role = {cfg.text_column: "text", cfg.label_column: "label"}
    if cfg.text_pair_column:
        role[cfg.text_pair_column] = "text pair"
    if cfg.id_column:
        role[cfg.id_column] = "id"
    wanted = [cfg.text_column, cfg.text_pair_column, cfg.id_column]
    if classify:
        wanted.append(cfg.label_column)
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    out = {s: [] for s in SPLITS}
    for split, path in files.items():
        if path is None:
            continue
        ds = _load_file(path, cfg.format)
        _require_columns(ds, wanted, str(path), role)
        for row in ds:
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
    # string / arbitrary labels -> 0..K-1 (sorted, so the mapping is stable)
    names: list[str] = []
    if classify:
        values = sorted({r["label"] for rows in out.values() for r in rows}, key=str)
        if any(v is None or v == "" for v in values):
            raise TaskError(f"label column {cfg.label_column!r} has empty values")
        names = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
        for rows in out.values():
            for r in rows:
                r["label"] = index[r["label"]]
    return out, names


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
    names = list(ds["train"].features["label"].names)
    out = {s: [] for s in SPLITS}
    source = {"train": "train", "test": "validation_matched" if task == "mnli" else "validation"}
    for theirs, rows in ((source["train"], None), (source["test"], "test")):
        for row in ds[theirs]:
            key = f"{task}:{theirs}:{row['idx']}"
            split = rows or split_of(key, cfg.val_fraction, 0.0)
            out[split].append(_row(key, row[text], row[pair] if pair else None, int(row["label"])))
    return out, names


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
    data = TaskData(name=cfg.name, kind=kind, metric=metric, higher_is_better=higher,
                    pad_id=_pad_id(tokenizer), max_length=cfg.max_length,
                    num_labels=len(names) if classify else None, label_names=names)
    for split in SPLITS:
        limit = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
        part = sorted(rows[split], key=lambda r: r["order"])
        if classify:
            if limit is not None:
                part = part[:limit]
            ids = _encode(tokenizer, [r["text"] for r in part])
            if part and part[0]["pair"] is not None:
                sep = [eos] if eos is not None else []
                ids = [a + sep + b for a, b in zip(ids, _encode(tokenizer, [r["pair"] for r in part]))]
            data.splits[split] = [(x[:cfg.max_length] or [data.pad_id], r["label"])
                                  for x, r in zip(ids, part)]
        else:
            if eos is None:
                raise TaskError("lm fine-tuning needs a tokenizer with an EOS token")
            stream: list[int] = []
            for x in _encode(tokenizer, [r["text"] for r in part]):
                stream += x + [eos]
            n = len(stream) // cfg.max_length
            if limit is not None:
                n = min(n, limit)
            if n == 0:
                raise TaskError(f"task {cfg.name!r}: the {split} split has fewer than "
                                f"{cfg.max_length} tokens (one block)")
            data.splits[split] = torch.tensor(stream[:n * cfg.max_length],
                                              dtype=torch.long).view(n, cfg.max_length)
        data.stats[split] = len(data.splits[split])
    if classify:
        counts = [0] * data.num_labels
        for _, label in data.splits["train"]:
            counts[label] += 1
        data.stats["train_label_counts"] = counts
        # A classifier that always answers the majority class: the floor any model must beat.
        data.stats["majority_accuracy_test"] = max(
            sum(1 for _, y in data.splits["test"] if y == c) for c in range(data.num_labels)
        ) / len(data.splits["test"])
    return data


# --- metrics --------------------------------------------------------------------------------------
def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy, F1 (binary: class 1; multi-class: macro) and Matthews correlation from a
    confusion matrix [true, predicted]."""
    c = confusion.double()
    total = c.sum().item()
    correct = c.diag().sum().item()
    out = {"accuracy": correct / total if total else float("nan")}
    tp = c.diag()
    fp = c.sum(0) - tp
    fn = c.sum(1) - tp
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), torch.zeros_like(tp))
    out["f1"] = f1[1].item() if c.shape[0] == 2 else f1.mean().item()
    # Multi-class MCC (Gorodkin): (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))
    t, p = c.sum(1), c.sum(0)
    num = correct * total - (p * t).sum().item()
    den = math.sqrt(max(0.0, (total**2 - (p * p).sum().item()) * (total**2 - (t * t).sum().item())))
    out["matthews"] = num / den if den > 0 else 0.0
    return out


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
