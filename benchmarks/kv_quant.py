"""KV quantization (KIVI-style int8/int4): reconstruction error of the stored K/V (or MLA latent) and the
logit drift it causes, with the bytes saved, for a GQA and an MLA model (random weights, fp32).

Reconstruction: the unquantized cache of a reference run is quantized and dequantized with each setting's
grouping (keys / latent per channel over groups of tokens, values per token over groups of channels) on
exactly the tokens that setting would hold quantized; reported as relative Frobenius error and the worst
element error relative to the tensor's largest magnitude. Drift: teacher-forced cached decoding
(a short prefill, then one token at a time) with the quantized cache against the full forward without a
cache: max and mean |logit difference|, mean KL(full || quantized) and top-1 agreement.
Random weights (scaled x3 so attention is not uniform) make this a stress test, not a quality claim.

    python benchmarks/kv_quant.py            # 1024 tokens
    python benchmarks/kv_quant.py --quick    # 160 tokens (validation)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import kvlab  # noqa: E402
from kvlab import Model, ModelConfig  # noqa: E402
from kvlab.attention.mla import LatentCacheLayer  # noqa: E402
from kvlab.cache.quantized import dequantize, quantize, quantized_tokens  # noqa: E402

SETTINGS = [("int8", 32, 32), ("int8", 32, 0), ("int4", 32, 32), ("int4", 32, 0), ("int4", 64, 128)]
PREFILL = 32


def base_layers() -> dict[str, dict]:
    return {"GQA-4": {"type": "full", "n_heads": 8, "n_kv_heads": 2, "head_dim": 32},
            "MLA": {"type": "mla", "n_heads": 8, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
                    "qk_nope_head_dim": 32, "v_head_dim": 32}}


def config(layer: dict, setting: tuple | None) -> ModelConfig:
    if setting is not None:
        kind, group, residual = setting
        layer = {**layer, "kv_quant": kind, "kv_quant_group": group, "kv_quant_residual": residual}
    return ModelConfig.from_dict({"vocab_size": 512, "d_model": 256, "n_layers": 2, "mlp_hidden": 512,
                                  "layers": [layer, layer]})


def build(cfg: ModelConfig, reference: Model | None) -> Model:
    torch.manual_seed(0)
    model = Model(cfg).eval()
    with torch.no_grad():
        if reference is not None:
            model.load_state_dict(reference.state_dict())
        else:
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(3.0)
    return model


@torch.no_grad()
def cached_logits(model: Model, ids: torch.Tensor):
    cache = model.new_cache(ids.shape[0])
    outs = [model(ids[:, :PREFILL], cache=cache)]
    outs += [model(ids[:, t:t + 1], cache=cache) for t in range(PREFILL, ids.shape[1])]
    return torch.cat(outs, dim=1), cache


def stored_streams(cache) -> list[tuple[str, str, torch.Tensor]]:
    """(name, grouping mode, tensor [B, H, T, W]) of every stored stream of an unquantized cache."""
    out = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LatentCacheLayer):
            out.append((f"layer{i}.latent", "channel", layer.buffers["latent"].view()))
        else:
            k, v = layer.read()
            out += [(f"layer{i}.k", "channel", k), (f"layer{i}.v", "token", v)]
    return out


def reconstruction(streams, setting) -> dict:
    kind, group, residual = setting
    result = {}
    for name, mode, x in streams:
        q = quantized_tokens(x.shape[2], group, residual)
        if q == 0:
            continue  # every token still in the full-precision residual
        part = x[:, :, :q]
        codes, scale, zero = quantize(part, mode, kind, group, part.dtype)
        back = dequantize(codes, scale, zero, mode, kind, group, part.shape[-1], part.dtype)
        result[name] = {"tokens": q, "rel_fro": ((back - part).norm() / part.norm()).item(),
                        "max_rel": ((back - part).abs().max() / part.abs().max()).item()}
    return result


def drift(full: torch.Tensor, quant: torch.Tensor) -> dict:
    logp, logq = full.log_softmax(-1), quant.log_softmax(-1)
    return {"max_abs": (full - quant).abs().max().item(), "mean_abs": (full - quant).abs().mean().item(),
            "mean_kl": (logp.exp() * (logp - logq)).sum(-1).mean().item(),
            "top1_agree": (full.argmax(-1) == quant.argmax(-1)).float().mean().item(),
            "logit_scale": full.abs().max().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="160 tokens (validation)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokens = 160 if args.quick else 1024
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    lines = ["# KV quantization: reconstruction error and logit drift", "",
             f"2 layers, d_model 256, random weights x3, fp32, {tokens} tokens (prefill {PREFILL}, then 1 token per "
             "step), batch 1. Bytes: measured cache at the end vs unquantized; planner bf16 per token at 128K.", "",
             "| model | setting (bits/group/residual) | stored | rel. error (Frobenius) | worst element / max | "
             "max abs logit drift | mean KL | top-1 agree | bytes vs fp | bf16 B/token @128K |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model_name, layer in base_layers().items():
        reference = build(config(layer, None), None)
        with torch.no_grad():
            full = reference(ids)
        _, ref_cache = cached_logits(reference, ids)
        streams = stored_streams(ref_cache)
        fp_plan = kvlab.plan(reference.config, context=131072, dtype="bf16")
        for setting in SETTINGS:
            model = build(config(layer, setting), reference)
            logits, cache = cached_logits(model, ids)
            recon = reconstruction(streams, setting)
            d = drift(full, logits)
            plan = kvlab.plan(model.config, context=131072, dtype="bf16")
            assert kvlab.plan(model.config, context=tokens).total_bytes == cache.nbytes  # planner is exact
            row = {"model": model_name, "setting": list(setting), "reconstruction": recon, "drift": d,
                   "cache_bytes": cache.nbytes, "unquantized_bytes": ref_cache.nbytes,
                   "bf16_bytes_per_token_128k": plan.bytes_per_token,
                   "bf16_unquantized_bytes_per_token_128k": fp_plan.bytes_per_token}
            rows.append(row)
            tail = (f"{d['max_abs']:.3f} (of {d['logit_scale']:.1f}) | {d['mean_kl']:.1e} | {d['top1_agree']:.3f} | "
                    f"{cache.nbytes / ref_cache.nbytes:.3f} | {plan.bytes_per_token:,.0f} "
                    f"(fp {fp_plan.bytes_per_token:,.0f}) |")
            kinds = [k for k in ("k", "v", "latent") if any(n.endswith("." + k) for n in recon)]
            for kind in kinds or ["none quantized yet"]:
                parts = [r for name, r in recon.items() if name.endswith("." + kind)]
                rel = f"{sum(p['rel_fro'] for p in parts) / len(parts):.2e}" if parts else "-"
                worst = f"{max(p['max_rel'] for p in parts):.2e}" if parts else "-"
                lines.append(f"| {model_name} | {'/'.join(map(str, setting))} | {kind} | {rel} | {worst} | {tail}")
                print(lines[-1], flush=True)
    paths = write_results("kv_quant_quick" if args.quick else "kv_quant",
                          {"quick": args.quick, "tokens": tokens, "prefill": PREFILL, "rows": rows}, "\n".join(lines))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
