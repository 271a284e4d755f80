"""LoRA distillation memory: DMD2 with full copies (student and critic deep copies of the teacher) against LoRA
(student and critic adapters on the one frozen base, ``DistillConfig.lora``), on a diffusers Wan transformer of
``--layers`` blocks (default 6 blocks of width 512, ffn 2048: ~25M parameters), float32, one process, CPU.

Measured, for each variant (the same teacher weights, the same batch):

- **state**: bytes of the distinct parameter storages of the composed model (teacher + student + critic, or the one
  base with the student and critic adapters inside; no EMA), plus the optimizer states after one student and
  one critic step (Adam: ``exp_avg`` and ``exp_avg_sq``; the ``step`` scalars too), plus the gradients of the larger
  phase (the bytes of the ``.grad`` tensors right after its backward; ``optimizer_step`` frees them with
  ``zero_grad(set_to_none=True)``). Goal: LoRA <= 0.45x full.
- **peak of a student-phase step**: the bytes held before the step (parameters + optimizer states; no gradients)
  plus the peak of the live bytes of every tensor the step creates (``training_step`` + ``backward`` +
  ``optimizer_step``), followed by a ``TorchDispatchMode`` that registers each operator's output storage and drops
  it once a weak reference says it was freed (checked after every operator). Tensors held before the step are not
  counted twice; scratch memory inside one kernel and the allocator's overhead are not seen. Goal: LoRA <= 0.6x.

LoRA: rank ``--rank`` (16) on the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, self- and
cross-attention) and the MLP (``ffn.net.0.proj``, ``ffn.net.2``), alpha = rank.

    python benchmarks/lora_memory.py [--layers 6] [--width 512] [--heads 8] [--ffn 2048] [--rank 16]
                                     [--frames 4] [--size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from distill_mixins import DMD2Config, DMD2Mixin, LoraSpec, OptimizerConfig
from distill_mixins.hosts import WanVideo2WorldHost
from distill_mixins.parallel.memory import LiveBytes

MIB = 2**20
GOALS = {"state": 0.45, "peak": 0.6}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
CHANNELS, TEXT_LEN, TEXT_DIM = 16, 16, 64


class WanDMD2(DMD2Mixin, WanVideo2WorldHost):
    """DMD2 on the diffusers Wan host."""


def build(args: argparse.Namespace, lora: bool) -> WanDMD2:
    torch.manual_seed(0)
    net = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.width // args.heads,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=args.ffn,
        num_layers=args.layers, rope_max_seq_len=64,
    )
    adam = OptimizerConfig(name="adam", lr=1e-4, weight_decay=0.0)
    spec = LoraSpec(rank=args.rank, alpha=float(args.rank), target_modules=TARGETS) if lora else None
    return WanDMD2(net, distill=DMD2Config(lora=spec, student_update_freq=2, guidance_scale=2.0,
                                           student_optimizer=adam, critic_optimizer=adam))


def make_batch(args: argparse.Namespace, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x0": torch.randn(1, CHANNELS, args.frames, args.size, args.size, generator=g),
            "prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)}


def _storages(tensors: list[torch.Tensor]) -> dict[int, int]:
    """Distinct storages (data pointer -> bytes) of ``tensors``."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}


def optimizer_tensors(model: WanDMD2) -> list[torch.Tensor]:
    return [v for opt in model.optimizers().values() for s in opt.state.values() for v in s.values()
            if isinstance(v, torch.Tensor)]


def measure(args: argparse.Namespace, lora: bool) -> dict[str, Any]:
    model = build(args, lora)
    params = _storages(list(model.parameters()))
    grads = 0
    for it in (0, 1, 2):  # student, critic, student: every optimizer has state; then the measured student step
        _, loss = model.training_step(make_batch(args, it), it)
        loss.backward()
        grads = max(grads, sum(_storages([p.grad for p in model.parameters() if p.grad is not None]).values()))
        model.optimizer_step(it)
    optim = _storages(optimizer_tensors(model))
    held = {**params, **optim, **_storages(list(model.buffers()))}
    batch = make_batch(args, 3)
    existing = set(held) | set(_storages(list(batch.values())))
    with LiveBytes(existing) as tracker:
        _, loss = model.training_step(batch, 4)  # iteration 4: a student phase
        loss.backward()
        model.optimizer_step(4)
    trained = sum(p.numel() for net in model.trainable_networks().values() for p in net.parameters())
    return {
        "params": sum(params.values()), "grads": grads, "optim": sum(optim.values()),
        "state": sum(params.values()) + grads + sum(optim.values()),
        "held": sum(held.values()), "step_live": tracker.peak, "peak": sum(held.values()) + tracker.peak,
        "n_base": sum(p.numel() for p in model.net_teacher.parameters()), "n_trained": trained,
    }


def cpu_kind() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} (torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full, lora = measure(args, lora=False), measure(args, lora=True)
    print(f"CPU: {cpu_kind()}; float32; torch {torch.__version__}")
    print(f"host: WanTransformer3DModel, {args.layers} blocks, width {args.width}, ffn {args.ffn}: "
          f"{full['n_base'] / 1e6:.1f}M parameters; latent (1, {CHANNELS}, {args.frames}, {args.size}, {args.size})")
    print(f"LoRA rank {args.rank} on {', '.join(TARGETS)}: {lora['n_trained'] / 1e6:.2f}M trained parameters "
          f"(student + critic adapters), full copies train {full['n_trained'] / 1e6:.1f}M")
    print()
    print("| DMD2, per process | full copies (MiB) | LoRA (MiB) | LoRA / full | goal |")
    print("|---|---|---|---|---|")
    rows = [("parameters (distinct storages)", "params", None), ("gradients (larger phase)", "grads", None),
            ("optimizer states (Adam, both phases)", "optim", None),
            ("**parameters + gradients + optimizer states**", "state", "state"),
            ("held before a student step (parameters + optimizer states)", "held", None),
            ("peak live bytes created by the student step", "step_live", None),
            ("**peak of a student-phase step**", "peak", "peak")]
    for label, key, goal in rows:
        ratio = lora[key] / full[key] if full[key] else float("nan")
        mark = f"<= {GOALS[goal]} {'met' if ratio <= GOALS[goal] else 'MISSED'}" if goal else ""
        print(f"| {label} | {full[key] / MIB:.1f} | {lora[key] / MIB:.1f} | {ratio:.3f}x | {mark} |")


if __name__ == "__main__":
    main()
