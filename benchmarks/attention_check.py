"""Are attention's gradients right on this device? Each scaled_dot_product_attention kernel the
device offers, in bf16, against the math kernel in fp32, through the model's own attention
path (coatnet_scale.models.coatnet.attention with the relative-position bias gathered from its
table, q, k and v laid out as the model's qkv projection leaves them), at the token counts
CoAtNet trains: 224 px: 196 and 49; 384: 576 and 144; 512: 1024 and 256.

    python benchmarks/attention_check.py --out attention.json              # every kernel, all six counts
    python benchmarks/attention_check.py --tokens 576 --out bias576.json   # one count (the 384 px fine-tune)

A kernel is right at a count when the gradients of the bias table, q, k and v are finite and
each within TOLERANCE (relative Frobenius error) of fp32 math; the kernel the engine runs
(model.attention_backend=auto, or --backend) must be right at every count, or this exits 1.
Other kernels that run but are wrong are reported WRONG, loudly; ones that refuse the inputs,
unavailable. benchmarks/gpu_proof.py runs this as its first part.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from coatnet_scale.models.coatnet import (  # noqa: E402
    KERNELS,
    attention,
    attention_order,
    kernel_that_ran,
    relative_position_index,
)

TOKENS = (196, 49, 576, 144, 1024, 256)
# bf16 keeps 8 significant bits (2^-8 = 0.4%); a gradient summed over N keys loses a few more.
# bf16 math against fp32 math measures 0.3-0.6% on the CPU at these sizes: 3% is well clear of
# rounding and far below a wrong kernel (a dropped bias gradient is 100%, a NaN never passes).
TOLERANCE = {"table": 0.03, "q": 0.03, "k": 0.03, "v": 0.03}


class Case:
    """One attention call's inputs at `tokens` (a square grid): fp32 leaves and an upstream gradient."""

    def __init__(self, tokens: int, batch: int, heads: int, head_dim: int, device: torch.device, seed: int = 0):
        side = math.isqrt(tokens)
        generator = torch.Generator().manual_seed(seed + tokens)
        self.qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=generator).to(device)
        self.table = (0.5 * torch.randn(heads, 2 * side - 1, 2 * side - 1, generator=generator)).to(device)
        self.index = relative_position_index(side, side).to(device)
        self.weights = torch.randn(batch, heads, tokens, head_dim, generator=generator).to(device)

    def gradients(self, kernels: tuple[str, ...], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], str]:
        """fp32 gradients of table, q, k, v under `kernels` in `dtype`, and the kernel that ran."""
        qkv = self.qkv.to(dtype, copy=True).requires_grad_()  # a fresh leaf per call
        table = self.table.clone().requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # as RelativeAttention.forward
        bias = table.flatten(1)[:, self.index].to(dtype).unsqueeze(0).expand(q.shape[0], -1, -1, -1)
        y = attention(q, k, v, bias, kernels)
        (y.float() * self.weights).sum().backward()
        grad = qkv.grad.float()
        return {"table": table.grad, "q": grad[:, :, 0], "k": grad[:, :, 1], "v": grad[:, :, 2]}, kernel_that_ran(y)


def errors(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative Frobenius error per gradient; inf where it holds a NaN or inf, or is missing."""
    out = {}
    for name, ref in reference.items():
        g = got.get(name)
        if g is None or not torch.isfinite(g).all():
            out[name] = math.inf
        else:
            out[name] = ((g - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return out


def seconds_per_call(case: Case, kernel: str, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Forward and backward of one call (median of `repeats`, after a warm-up)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    case.gradients((kernel,), dtype)
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        case.gradients((kernel,), dtype)
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_kernel(case: Case, kernel: str, reference: dict, dtype, device, repeats: int) -> dict:
    try:
        with warnings.catch_warnings():  # torch warns why each refusing kernel refused
            warnings.simplefilter("ignore")
            got, ran = case.gradients((kernel,), dtype)
    except RuntimeError as e:
        why = str(e).splitlines()[0][:300]
        # No kernel of that kind takes these inputs: refused at dispatch. Any other error (in
        # backward, say) is a kernel that runs and then breaks training: wrong.
        refused = "No available kernel" in why or "No viable backend" in why
        return {"verdict": "unavailable" if refused else "WRONG", "why": why}
    err = errors(got, reference)
    right = ran == kernel and all(err[name] <= TOLERANCE[name] for name in TOLERANCE)
    return {"verdict": "right" if right else "WRONG", "ran": ran, "errors": err,
            "ms": 1e3 * seconds_per_call(case, kernel, dtype, device, repeats)}


def run(device: torch.device, tokens=TOKENS, batch: int = 8, heads: int = 20, head_dim: int = 64,
        backend: str = "auto", repeats: int = 5) -> dict:
    """Every kernel at every count; `engine`: the kernel `backend` runs and whether it is right."""
    dtype = torch.bfloat16
    rows = []
    for n in tokens:
        case = Case(n, batch, heads, head_dim, device)
        reference, _ = case.gradients(("math",), torch.float32)
        row = {"tokens": n, "kernels": {k: check_kernel(case, k, reference, dtype, device, repeats) for k in KERNELS}}
        _, row["engine_ran"] = case.gradients(attention_order(backend, device), dtype)
        rows.append(row)
    verdicts = {k: [r["kernels"][k]["verdict"] for r in rows] for k in KERNELS}
    right = [k for k, v in verdicts.items() if all(x == "right" for x in v)]
    engine = sorted({r["engine_ran"] for r in rows})
    fastest = min(right, key=lambda k: sum(r["kernels"][k]["ms"] for r in rows)) if right else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "capability": "sm%d%d" % torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
        "dtype": "bfloat16 against float32 math", "batch": batch, "heads": heads, "head_dim": head_dim,
        "tolerance": TOLERANCE, "rows": rows, "backend": backend, "order": list(attention_order(backend, device)),
        "engine_kernels": engine, "engine_right": all(k in right for k in engine),
        "wrong": [k for k, v in verdicts.items() if "WRONG" in v], "right_everywhere": right,
        "auto_choice": fastest,
    }


def table(report: dict) -> str:
    lines = [f"attention on {report['device']}, bf16 vs fp32 math, {report['heads']} heads of {report['head_dim']}, "
             f"batch {report['batch']}; tolerance {max(report['tolerance'].values()):.0%} per gradient",
             f"| {'tokens':>6} | " + " | ".join(f"{k:<22}" for k in KERNELS) + " | engine |"]
    for r in report["rows"]:
        cells = []
        for k in KERNELS:
            c = r["kernels"][k]
            cells.append(f"{c['verdict']:<11} {c['ms']:7.2f}ms" if "ms" in c else f"{c['verdict']:<22}")
        lines.append(f"| {r['tokens']:>6} | " + " | ".join(cells) + f" | {r['engine_ran']} |")
    lines.append(f"engine (model.attention_backend={report['backend']}, order {', '.join(report['order'])}) runs "
                 f"{', '.join(report['engine_kernels'])}: {'right' if report['engine_right'] else 'WRONG'} at every count; "
                 f"fastest right everywhere: {report['auto_choice']}")
    for k in report["wrong"]:
        lines.append(f"WRONG: the {k} kernel's gradients are off (errors in the JSON); auto must not pick it")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, action="append", help="token counts (default: the six)")
    parser.add_argument("--heads", type=int, default=20, help="default 20: CoAtNet-5's stage 3")
    parser.add_argument("--head-dim", type=int, default=64, help="default 64: CoAtNet-5 (CoAtNet-6/7: 128)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", default="auto", help="model.attention_backend the engine runs")
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    report = run(device, tuple(args.tokens or TOKENS), args.batch, args.heads, args.head_dim, args.backend)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0 if report["engine_right"] else 1


if __name__ == "__main__":
    sys.exit(main())
