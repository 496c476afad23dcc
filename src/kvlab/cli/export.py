"""``kvlab export``: a checkpoint in a format stock engines serve unmodified, checked by a round trip."""

from __future__ import annotations

from kvlab.cli._args import positive_int


def add_parser(sub):
    p = sub.add_parser("export", help="write a checkpoint for stock transformers/vLLM (hf) or llama.cpp (gguf)",
                       description="Export a kvlab (or HF) checkpoint as a stock Hugging Face model (safetensors + "
                       "config.json of Llama, Mistral, Qwen2 or DeepSeek V3; no remote code) or a llama-arch GGUF, "
                       "then reload it in the target engine and compare logits and greedy tokens with kvlab "
                       "(saved as export_check.json). Models no stock family represents exactly are refused.")
    p.add_argument("ckpt", help="checkpoint folder (kvlab or Hugging Face)")
    p.add_argument("--format", required=True, choices=["hf", "gguf"], help="hf: transformers/vLLM; gguf: llama.cpp")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --force)")
    p.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF weight type (default f32)")
    p.add_argument("--force", action="store_true", help="replace a previous export in --out (only the files "
                   "it listed in its manifest are removed)")
    p.add_argument("--no-check", action="store_true", help="skip the round-trip check")
    p.add_argument("--vllm", action="store_true", help="hf: also check greedy tokens in vLLM (needs .venv-vllm)")
    p.add_argument("--tokens", type=positive_int, default=16, help="greedy tokens compared (default 16)")
    return p


def run(args) -> int:
    import torch

    from kvlab.export import export

    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = export(args.ckpt, args.format, args.out, force=args.force, gguf_type=args.gguf_type,
                    check=not args.no_check, n_new=args.tokens, vllm=args.vllm)
    failed = [r for r in report.get("checks", []) if r.get("greedy_ok") is False]
    return 1 if failed else 0
