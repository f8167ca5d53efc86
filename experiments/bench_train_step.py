"""Benchmark: what one training step of each method costs, eager and `torch.compile`d, and how
close a real Trainer run on CIFAR-format data gets to the bare step.

Per variant (frozen random ViT; timing does not depend on the weights) it times the bare step
`forward -> MultiExitLoss -> backward -> AdamW step -> zero_grad` (the project's network, loss
and optimizer), steps of all variants interleaved in a rotating order, and reports medians:

- linear_probe, adapter (AdaptFormer r8, one exit), lora (r8 on q, v), met_1exit (E-adapter,
  one exit: the single-exit reference), met (E-adapters, 4 exits, graph regularizer)
- ms / step (median), img / s, peak memory, ratio to met_1exit and to adapter (AdaptFormer)
- peak memory: CUDA `max_memory_allocated` over the steps above the model's own memory; on CPU
  the bytes autograd saves for backward in one step (`saved_tensors_hooks`, distinct storages)
  plus gradients and AdamW state: the step's working memory, exact and repeatable (RSS on a
  shared machine is neither)

Then a real `met_lightning.train.train` run (Hydra config, DataModule with workers, Lightning
Trainer, progress bar, logging) of `met` on CIFAR-100 files written in the real pickle format
(random pixels), measured from the end of batch `--warmup` to the end of the epoch's last batch,
against the bare step of the same model, batch and input size.

    python experiments/bench_train_step.py                                     # CPU, small
    python experiments/bench_train_step.py --device cuda --precision bf16 \
        --model vit_base_patch16_224 --img 224 --batch 128 --trainer-batches 60
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch

if __package__ in (None, ""):  # run as a script: python experiments/NAME.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_common import machine, sync, timed  # noqa: E402
from met_lightning.losses.multi_exit import MultiExitLoss
from met_lightning.models.backbone import create_backbone
from met_lightning.models.multi_exit_vit import MultiExitViT
from met_lightning.training.module import MultiExitClassifier
from met_lightning.training.optim import AdamW
from tests.data_fixtures import write_cifar100  # noqa: E402 - the real pickle format

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 100
# the CPU default: the demo backbone's geometry (12 blocks, width 96, 32 px, 8 px patches)
DEMO_KWARGS = dict(img_size=32, patch_size=8, embed_dim=96, depth=12, num_heads=3)
VARIANTS = ("linear_probe", "adapter", "lora", "met_1exit", "met")


def variant_kwargs(name: str, depth: int) -> tuple[dict[str, Any], float]:
    """MultiExitViT keyword arguments and graph weight of a variant (the methods' configs)."""
    one = dict(exit_specific=False, separate_cls=False)
    four = [round(depth * i / 4) for i in range(1, 5)]
    kind, exits, graph_weight, adapter = {
        "linear_probe": ("none", [depth], 0.0, dict(**one, sites=[])),
        "adapter": ("adaptformer", [depth], 0.0, dict(**one, sites=["mlp"])),
        "lora": ("lora", [depth], 0.0, dict(**one, sites=["q", "v"])),
        "met_1exit": ("e_adapter", [depth], 0.0, {}),
        "met": ("e_adapter", four, 0.1, {}),
    }[name]
    return dict(exits=exits, adapter=dict(kind=kind, **adapter)), graph_weight


class Step:
    """One variant: network, loss and optimizer; `__call__` runs one training step."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, compiled: bool):
        torch.manual_seed(0)
        backbone = create_backbone(args.timm_name, model_kwargs=args.model_kwargs)
        kwargs, graph_weight = variant_kwargs(name, len(backbone.blocks))
        net = MultiExitViT(backbone, NUM_CLASSES, **kwargs).to(device).train()
        loss = MultiExitLoss(net.num_exits, graph_weight=graph_weight).to(device)
        self.module = MultiExitClassifier(net, loss, optimizer=AdamW)
        if compiled:
            self.module.compile_network(mode=args.compile_mode, backend=args.backend)
        self.net, self.loss = net, loss
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.optimizer = AdamW(named, lr=1e-3, weight_decay=1e-4)
        self.name = name + (" (compiled)" if compiled else "")
        self.device = device
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if args.precision == "bf16"
            else nullcontext()
        )
        g = torch.Generator().manual_seed(1)
        self.images = torch.randn(args.batch, 3, args.img, args.img, generator=g).to(device)
        self.labels = (torch.arange(args.batch) % NUM_CLASSES).to(device)

    def __call__(self) -> None:
        with self.autocast:
            out = self.net(self.images)
        parts = self.loss(out.logits, out.features, self.labels)  # fp32, outside autocast
        parts.total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def memory_mib(self) -> float:
        """CUDA: peak allocated during one step above the memory before it. CPU: the bytes
        autograd saves in one forward (distinct storages) + gradients + AdamW state."""
        if self.device.type == "cuda":
            sync(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self()
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast:
            out = self.net(self.images)
            parts = self.loss(out.logits, out.features, self.labels)
        saved = sum(storages.values())
        parts.total.backward()
        self.optimizer.step()
        grads = sum(p.numel() * p.element_size() for p in self.params)
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        return (saved + grads + state) / 2**20


def bench_steps(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    steps = [Step(v, args, device, compiled=False) for v in args.variants]
    if args.compile:
        steps += [Step(v, args, device, compiled=True) for v in args.variants]
    compile_s = {}
    for step in steps:  # warm-up; the first call of a compiled one compiles it
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        compile_s[step.name] = time.perf_counter() - start
        print(f"warm-up {step.name}: {compile_s[step.name]:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {s.name: [] for s in steps}
    for r in range(args.repeats):  # rotating order: drift of a shared machine hits all alike
        order = steps[r % len(steps) :] + steps[: r % len(steps)]
        for step in order:

            def block(step: Step = step) -> None:
                for _ in range(args.steps):
                    step()

            times[step.name].append(timed(block, device) / args.steps)
    rows = []
    for step in steps:
        ms = statistics.median(times[step.name]) * 1e3
        rows.append(
            {
                "variant": step.name,
                "ms_per_step": ms,
                "ms_min": min(times[step.name]) * 1e3,
                "img_per_s": args.batch / ms * 1e3,
                "memory_mib": step.memory_mib(),
                "warmup_s": compile_s[step.name],
                "trainable": sum(p.numel() for p in step.params),
            }
        )
    for row in rows:
        suffix = " (compiled)" if row["variant"].endswith("(compiled)") else ""
        for ref in ("met_1exit", "adapter"):
            base = next((r for r in rows if r["variant"] == ref + suffix), None)
            row[f"vs_{ref}"] = row["ms_per_step"] / base["ms_per_step"] if base else None
    return rows


# ---------------------------------------------------------------------- the real Trainer run
class ThroughputCallback(L.Callback):
    """img / s of the first training epoch from the end of batch `warmup` to the end of its last
    batch (data loading, Trainer, logging included), written as JSON to `out`."""

    def __init__(self, out: str, warmup: int = 3, device: str = "cpu") -> None:
        self.out, self.warmup, self.device = Path(out), int(warmup), torch.device(device)
        self.marks: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            sync(self.device)
            self.marks.append((time.perf_counter(), len(batch[1])))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0 and len(self.marks) > self.warmup + 1:
            timed = self.marks[self.warmup + 1 :]
            elapsed = self.marks[-1][0] - self.marks[self.warmup][0]
            self.out.write_text(json.dumps({
                "img_per_s": sum(n for _, n in timed) / elapsed,
                "ms_per_step": elapsed / len(timed) * 1e3,
                "batches": len(self.marks),
            }))  # fmt: skip


def trainer_run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from met_lightning.paths import config_dir
    from met_lightning.train import train

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # the callback's _target_ is experiments.bench_train_step...
        sys.path.insert(0, repo)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # data=cifar100 holds out 10 % of each class as its val pool (val_size draws 100 of it)
        n_train = args.trainer_batches * args.batch * 10 // 9 + 1000
        write_cifar100(root / "data", n_train=n_train, n_test=100)
        exits = ",".join(str(e) for e in variant_kwargs("met", depth_of(args))[0]["exits"])
        measured = root / "throughput.json"
        kwargs = ",".join(f"{k}:{v}" for k, v in args.model_kwargs.items())
        overrides = [
            "data=cifar100", f"data.root={root / 'data'}", "data.download=false",
            "data.val_size=100", f"data.batch_size={args.batch}",
            f"data.eval_batch_size={args.batch}", f"data.num_workers={args.workers}",
            "backbone=vit_tiny", f"backbone.name={args.timm_name}", "backbone.pretrained=false",
            f"++backbone.model_kwargs={{{kwargs}}}", f"model.net.exits=[{exits}]",
            "trainer.max_epochs=1", f"trainer.limit_train_batches={args.trainer_batches}",
            "trainer.limit_val_batches=1", "test=false", "logger=none",
            "callbacks.budget_analysis=null", "scheduler.warmup_epochs=0",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
            f"model.compile={str(args.trainer_compile).lower()}",
            "+callbacks.throughput._target_=experiments.bench_train_step.ThroughputCallback",
            f"+callbacks.throughput.out={measured}", f"+callbacks.throughput.warmup={args.warmup}",
            f"+callbacks.throughput.device={device}",
            f"paths.output_dir={root / 'run'}",
        ]  # fmt: skip
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        train(cfg)
        shown = [o for o in overrides if not o.startswith(("data.root", "paths.", "+callbacks"))]
        return {"overrides": shown, **json.loads(measured.read_text())}


def depth_of(args: argparse.Namespace) -> int:
    return len(create_backbone(args.timm_name, model_kwargs=args.model_kwargs).blocks)


# ---------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        f"# Training step per method ({a['device']}, {a['precision']})",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- date: {result['date']}",
        f"- model {a['model']} ({result['model_kwargs']}), {a['img']} px, batch {a['batch']}, "
        f"rank 8, {NUM_CLASSES} classes, random weights; compiled: `nn.Module.compile` of "
        f"network and loss, backend {a['backend']}",
        f"- {a['repeats']} rotating repeats of {a['steps']} steps after {a['warmup']} warm-up "
        "steps; median ms per step (forward, loss, backward, AdamW step)",
        f"- memory: {result['memory_kind']}",
        "",
        "| variant | trainable | ms / step | min | img / s | vs met_1exit | vs adapter "
        "| memory MiB | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["steps"]:
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['trainable']:,} | {r['ms_per_step']:.1f} | {r['ms_min']:.1f} "
            f"| {r['img_per_s']:.0f} | {ratio(r['vs_met_1exit'])} | {ratio(r['vs_adapter'])} "
            f"| {r['memory_mib']:.1f} | {r['warmup_s']:.1f} |"
        )
    t = result.get("trainer")
    if t:
        lines += [
            "",
            f"## Real Trainer run (`met`, CIFAR-100 pickle files, {a['workers']} workers, "
            f"model.compile={str(a['trainer_compile']).lower()})",
            "",
            f"- {t.get('batches')} training batches; timed from the end of batch {a['warmup']} "
            "to the end of the epoch (data loading, Lightning, logging included)",
            f"- Trainer: {t.get('img_per_s', float('nan')):.0f} img/s "
            f"({t.get('ms_per_step', float('nan')):.1f} ms / batch); bare step of the same model "
            f"({result['trainer_reference']}): {t.get('bare_img_per_s', float('nan')):.0f} img/s; "
            f"**ratio {t.get('ratio_to_bare', float('nan')):.2f}**",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--model", default="demo", help="timm ViT name, or demo (CPU default)")
    p.add_argument("--img", type=int, default=None, help="input size (demo: 32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--backend",
        default=None,
        help="torch.compile backend (default: inductor on "
        "cuda; aot_eager on cpu, where inductor's C++ codegen takes minutes per variant "
        "on a small machine: the CPU figures show the compiled path's overhead only)",
    )
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--trainer-batches", type=int, default=20, help="0: no Trainer run")
    p.add_argument("--trainer-compile", action="store_true", help="model.compile=true there")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (1: a shared machine's cores are not ours)",
    )
    p.add_argument("--out", default=None, help="results stem (default results/bench_train_step_"
                   "<device>)")  # fmt: skip
    args = p.parse_args(argv)
    if 0 < args.trainer_batches <= args.warmup + 1:  # the callback times batches after warm-up
        p.error(
            f"--trainer-batches {args.trainer_batches} leaves no batch to time after "
            f"--warmup {args.warmup}: give at least {args.warmup + 2} (or 0: no Trainer run)"
        )
    if args.backend is None:
        args.backend = "inductor" if args.device.startswith("cuda") else "aot_eager"
    if args.model == "demo":
        args.timm_name, args.model_kwargs = "vit_tiny_patch16_224", dict(DEMO_KWARGS)
        args.img = args.img or DEMO_KWARGS["img_size"]
        args.model_kwargs["img_size"] = args.img
    else:
        args.timm_name, args.img = args.model, args.img or 224
        args.model_kwargs = {"img_size": args.img}
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    steps = bench_steps(args, device)
    result: dict[str, Any] = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "machine": machine(device),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "args": {k: v for k, v in vars(args).items() if k != "model_kwargs"},
        "model_kwargs": args.model_kwargs,
        "memory_kind": (
            "CUDA max_memory_allocated during one step above the allocation before it"
            if device.type == "cuda"
            else "CPU: bytes autograd saves in one forward (distinct storages) + gradients + "
            "AdamW state, exact (not RSS)"
        ),
        "steps": steps,
    }
    if args.trainer_batches > 0:
        trainer = trainer_run(args, device)
        ref = "met (compiled)" if args.trainer_compile else "met"
        bare = next((r for r in steps if r["variant"] == ref), None)
        if bare is not None and "img_per_s" in trainer:
            trainer["bare_img_per_s"] = bare["img_per_s"]
            trainer["ratio_to_bare"] = trainer["img_per_s"] / bare["img_per_s"]
        result["trainer"], result["trainer_reference"] = trainer, ref
    stem = Path(args.out) if args.out else RESULTS / f"bench_train_step_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
