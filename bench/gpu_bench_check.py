"""The bookkeeping of tools/gpu_check.sh: the import check and the stage table.

    python bench/gpu_bench_check.py imports OUT_DIR      # every import the device path needs
    python bench/gpu_bench_check.py stage OUT_DIR NAME STATUS SECONDS [NOTE]
    python bench/gpu_bench_check.py study-stages OUT_DIR STUDY_LOG START_EPOCH

Each call rewrites OUT_DIR/gpu_check.md from OUT_DIR/stages.json (+ bench.json, study.json),
so the table on disk is complete up to the last finished stage wherever the script stops.
Standard library only until the imports are known to work.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

# module -> distribution that provides it, for everything the device path imports (the
# project's own modules below pull in the rest at import time).
MODULES = {
    "torch": "torch", "numpy": "numpy", "transformers": "transformers",
    "tokenizers": "tokenizers", "safetensors": "safetensors", "yaml": "pyyaml",
    "tqdm": "tqdm", "psutil": "psutil", "xxhash": "xxhash", "sentencepiece": "sentencepiece",
    "pydantic": "pydantic", "deepspeed": "deepspeed", "hjson": "hjson", "cpuinfo": "py-cpuinfo",
    "msgpack": "msgpack", "einops": "einops", "streaming": "mosaicml-streaming",
    "brotli": "brotli", "snappy": "python-snappy", "zstd": "zstd", "catalogue": "catalogue",
    "datasets": "datasets", "pyarrow": "pyarrow", "pandas": "pandas", "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
}
PROJECT = ["pmp_scale.engine", "pmp_scale.release", "pmp_scale.study", "pmp_scale.finetune.train",
           "pmp_scale.nft.report", "pmp_scale.secrecy.report", "pmp_scale.authorized"]
VERSIONS = ["torch", "transformers", "tokenizers", "numpy", "deepspeed", "streaming", "pydantic",
            "datasets"]


def _state(out: Path) -> dict:
    path = out / "stages.json"
    return json.loads(path.read_text()) if path.is_file() else {"machine": {}, "stages": []}


def _save(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".stages.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(out / "stages.json")
    render(out, state)


def check_imports(out: Path) -> int:
    """Import everything first: one line naming what is missing and how to bring it."""
    import importlib
    missing, broken, versions = [], [], {}
    for module, dist in MODULES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            missing.append(f"{dist} ({module})" if err.name == module else
                           f"{err.name} (needed by {module})")
        except Exception as err:  # noqa: BLE001 - an installed but unusable package
            broken.append(f"{module}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        else:
            if module in VERSIONS:
                versions[module] = getattr(mod, "__version__", "?")
    if missing or broken:
        py = ".".join(map(str, sys.version_info[:2]))
        what = "; ".join(filter(None, [", ".join(missing) and "missing " + ", ".join(missing),
                                       ", ".join(broken) and "unusable " + ", ".join(broken)]))
        print(f"error: {what}: build the wheel set where pip works with `bash tools/gpu_wheels.sh "
              f"DIR --python {py}` (GPU_WHEELS_EXTRA=\"pkg ...\" for packages outside it), carry "
              f"DIR and pass it as WHEEL_DIR", file=sys.stderr)
        return 2
    for module in PROJECT:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            print(f"error: importing {module} failed: {type(err).__name__}: "
                  f"{str(err).splitlines()[0][:200]}", file=sys.stderr)
            return 2
    import torch
    state = _state(out)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state["machine"] = {
        "device": f"{torch.cuda.get_device_name()} x{gpus}" if gpus else "cpu",
        "python": sys.version.split()[0], **versions}
    _save(out, state)
    return 0


def add_stage(out: Path, name: str, status: str, seconds: float, note: str = "") -> None:
    state = _state(out)
    state["stages"] = [s for s in state["stages"] if s["stage"] != name]
    state["stages"].append({"stage": name, "status": status, "seconds": round(seconds, 1),
                            "note": note})
    _save(out, state)


def study_stages(out: Path, log: Path, start_epoch: float) -> None:
    """Split the study's time by its own log lines (`HH:MM:SS done <what>`): each finished
    piece took the time since the previous one."""
    day = time.localtime(start_epoch)
    prev = day.tm_hour * 3600 + day.tm_min * 60 + day.tm_sec + (start_epoch % 1)
    state = _state(out)
    state["stages"] = [s for s in state["stages"] if not s["stage"].startswith("study: ")]
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    for line in lines:
        m = re.match(r"^(\d\d):(\d\d):(\d\d) (done|reused) (.*)$", line)
        if not m:
            continue
        now = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
        if now < prev - 43200:  # past midnight
            now += 86400
        state["stages"].append({"stage": f"study: {m[5]}", "status": m[4],
                                "seconds": round(max(now - prev, 0.0), 1), "note": ""})
        prev = now
    _save(out, state)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(out: Path, state: dict) -> None:
    m = state["machine"]
    lines = ["# pmp_scale device check", ""]
    if m:
        lines += ["machine: " + ", ".join(f"{k} {v}" for k, v in m.items()), ""]
    lines += [f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", "",
              "| stage | status | seconds | result |", "|---|---|---:|---|"]
    top = 0.0
    for s in state["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']:.1f} | {s['note']} |")
        if not s["stage"].startswith(("study: ", "bench: ")):
            top += s["seconds"]
    lines += [f"| **total** | | {top:.1f} | |", ""]
    bench = out / "bench.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        lines += [f"## Bench: {b['preset']} ({b['params'] / 1e9:.3f}B), {b['precision']}, "
                  f"ZeRO-3, {b['attn']}, activation checkpointing "
                  f"{'on' if b['activation_checkpointing'] else 'off'}, {b['device']} "
                  f"x{b['world_size']}, {b['global_batch']} x {b['seq_len']} tokens/step", "",
                  "| | dense | PMP (ρ 0.7) |", "|---|---:|---:|",
                  f"| tokens/s | {b['dense_tokens_per_s']:,.0f} | {b['pmp_tokens_per_s']:,.0f} |",
                  f"| step (s, median) | {b['dense_step_s']:.4f} | {b['pmp_step_s']:.4f} |",
                  f"| MFU | {_fmt(b['dense_mfu'], '.3f')} | {_fmt(b['pmp_mfu'], '.3f')} |", "",
                  f"PMP/dense step time {b['pmp_dense_ratio']:.3f}; peak device memory "
                  f"{_fmt(b['peak_mem_gib'], '.2f')} GiB; mask state "
                  f"{b['mask_bits_per_param']:.3f} bits/parameter.", ""]
    study = out / "study.md"
    if study.is_file():
        lines += ["## Study (claims; the whole report is study.md)", ""]
        text = study.read_text().splitlines()
        first = next((i for i, ln in enumerate(text) if ln.startswith("| claim |")), None)
        if first is not None:
            end = next((i for i in range(first, len(text)) if not text[i].startswith("|")),
                       len(text))
            lines += text[first:end] + [""]
    tmp = out / ".gpu_check.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "gpu_check.md")


def main(argv: list[str]) -> int:
    cmd, out = argv[0], Path(argv[1])
    if cmd == "imports":
        return check_imports(out)
    if cmd == "stage":
        add_stage(out, argv[2], argv[3], float(argv[4]), " ".join(argv[5:]))
        return 0
    if cmd == "study-stages":
        study_stages(out, Path(argv[2]), float(argv[3]))
        return 0
    print(f"error: unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
