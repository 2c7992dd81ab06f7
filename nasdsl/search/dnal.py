"""DNAL, the paper's Algorithm 1, end to end: weights -> architecture -> derive -> finetune.

Every epoch ends with an atomic checkpoint; randomness (data order, augmentation, dropout) is
re-seeded from (seed, stage, epoch, rank) at each epoch start and the schedules are functions
of the step, so a resumed run follows exactly the path of an uninterrupted one.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from nasdsl.derive.derive import Derivation, derive, slim_state_dict
from nasdsl.errors import NasdslError
from nasdsl.graph.accounting import gate_channel_flops, network_cost
from nasdsl.graph.ir import Network
from nasdsl.train import distributed as dist_utils
from nasdsl.train.evaluate import accuracy
from nasdsl.pipeline.folder import Run, space_hash, write_json
from nasdsl.train.schedule import delta as delta_at
from nasdsl.train.schedule import learning_rate
from nasdsl.supernet.build import build_supernet, place_gates
from nasdsl.supernet.network import NasNet

BINARY_TOLERANCE = 1e-6


@dataclass
class SearchJob:
    """What `nasdsl search` was asked to do."""
    space: Path
    recipe: object              # nasdsl.recipe.Recipe
    data: str
    out: Path
    space_overrides: dict = field(default_factory=dict)
    device: str = "auto"
    resume: bool = False
    download: bool = False
    progress: bool = True


def stage_plan(recipe) -> list[str]:
    if recipe.strategy == "joint":
        return ["joint", "finetune"]
    return ["weights", "architecture", "finetune"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NasdslError(f"'{name}' is not a device (use cpu, cuda, cuda:N or auto)", file="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NasdslError("CUDA was asked for but no GPU is available", file="--device")
    return device


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, stage: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch * 101 + rank) % 2**63


class Search:
    def __init__(self, job: SearchJob):
        from nasdsl.language.compiler import compile_file
        from nasdsl.train.data import build_data

        self.job = job
        self.recipe = job.recipe
        self.device = resolve_device(job.device)
        self.world = dist_utils.init(self.device)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        # Everything that can fail on bad input fails here, before the run folder is touched.
        self.data = build_data(job.data, self.recipe.resolution, download=job.download)
        header = {"input": str(self.data.in_channels), "resolution": str(self.recipe.resolution),
                  "classes": str(self.data.num_classes)}
        self.space_text = Path(job.space).read_text()
        self.overrides = {**job.space_overrides, **header}
        self.network: Network = compile_file(job.space, self.overrides)
        self.run = Run(job.out, self.world.is_main)
        self.stages = stage_plan(self.recipe)
        self.hash = space_hash(self.space_text, self.overrides)
        self.state: dict = {"stage": self.stages[0], "epoch": 0, "results": {}, "stage_seconds": {},
                            "histograms": [], "notes": []}
        self.model: nn.Module | None = None
        self.derivation: Derivation | None = None
        self.optimizer_state: dict | None = None  # from a checkpoint, for the stage it was saved in

    # ---- run folder ------------------------------------------------------------------------
    def prepare_folder(self) -> None:
        folder = self.job.out
        exists = folder.exists() and any(folder.iterdir())
        if exists and not self.job.resume:
            raise NasdslError("the run folder already exists; pass --resume to continue it or --out to "
                              "choose another folder", file=str(folder))
        if self.job.resume and exists:
            manifest = self.run.read_manifest()
            if manifest.get("space_hash") != self.hash:
                raise NasdslError("this run searched a different space (or different --set values); "
                                  "resume it with the same space and settings", file=str(folder))
            if manifest.get("recipe") != self.recipe.to_dict():
                raise NasdslError("this run used a different recipe; resume it with the same recipe and --set",
                                  file=str(folder))
            return
        if self.world.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        dist_utils.barrier(self.world)
        self.run.write_manifest(space=str(self.job.space), space_hash=self.hash, space_overrides=self.overrides,
                                recipe=self.recipe.to_dict(), seed=self.recipe.seed, data=self.job.data,
                                device=str(self.device), world_size=self.world.size)

    # ---- data ------------------------------------------------------------------------------
    def loader(self, stage_index: int, epoch: int) -> DataLoader:
        """The training loader of one epoch: its order depends on (seed, stage, epoch) alone."""
        dataset = self.data.train
        if self.world.distributed:
            sampler = DistributedSampler(dataset, self.world.size, self.world.rank, shuffle=True,
                                         seed=self.recipe.seed + 7919 * stage_index, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            g = torch.Generator().manual_seed(_epoch_seed(self.recipe.seed, stage_index, epoch, 0))
            sampler = RandomSampler(dataset, generator=g)
        batch = self.recipe.batch_size
        return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=self.recipe.workers,
                          drop_last=len(dataset) // self.world.size >= batch,
                          pin_memory=self.device.type == "cuda")

    def place(self, model: nn.Module) -> nn.Module:
        """On the device, channels-last: 2-3x faster convolutions on CPU (oneDNN) and on GPU."""
        return model.to(self.device, memory_format=torch.channels_last)

    def batch(self, x: torch.Tensor, y: torch.Tensor):
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def evaluate(self, model: nn.Module) -> float:
        return accuracy(model, self.data.val, self.device, self.recipe.batch_size, self.recipe.workers,
                        self.world)["top1"]

    # ---- the run ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Prepare the run folder and the supernet, restoring the last checkpoint on --resume."""
        self.prepare_folder()
        checkpoint = self.run.load_checkpoint() if self.job.resume else None
        _seed_all(self.recipe.seed)
        arch = self.recipe.architecture
        self.model = self.place(build_supernet(self.network, self.recipe.gate_placement,
                                               depth_gates=arch.block_cost > 0))
        if arch.penalty_weight == "flops":
            self.model.gate_set.weigh(gate_channel_flops(self.network), arch.block_cost)
        if checkpoint is not None:
            self.restore(checkpoint)
            self.run.truncate_metrics(self.kept_metric)

    def execute(self) -> dict:
        self.setup()
        try:
            for stage in self.stages[self.stages.index(self.state["stage"]):]:
                self.state["stage"] = stage
                getattr(self, f"stage_{stage}")()
        finally:
            self.run.close()
        summary = self.summary()
        if self.world.is_main:
            write_json(self.job.out / "summary.json", summary)
            self.plots()
        dist_utils.shutdown(self.world)
        return summary

    def kept_metric(self, record: dict) -> bool:
        order = self.stages.index
        stage, epoch = self.state["stage"], self.state["epoch"]
        if record.get("stage") not in self.stages:
            return True
        return order(record["stage"]) < order(stage) or (record["stage"] == stage and record["epoch"] < epoch)

    def restore(self, checkpoint: dict) -> None:
        self.state = checkpoint["state"]
        if self.state["stage"] == "finetune":
            gates = self.state["gates"]
            self.derivation = derive(self.searched_graph(), {k: v > 0 for k, v in gates.items()}, gates,
                                     self.recipe.architecture.channel_multiple)
            self.model = self.place(NasNet(self.derivation.network.to_config()))
        self.model.load_state_dict(checkpoint["model"])
        gate_set = getattr(self.model, "gate_set", None)
        if gate_set is not None and checkpoint.get("gate_state"):
            gate_set.set_mode(checkpoint["gate_state"]["mode"])
            gate_set.set_delta(checkpoint["gate_state"]["delta"])
        self.optimizer_state = checkpoint.get("optimizer")

    def save(self, optimizer) -> None:
        gate_set = getattr(self.model, "gate_set", None)
        self.run.save_checkpoint({
            "state": self.state,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "gate_state": {"mode": gate_set.state.mode, "delta": gate_set.state.delta} if gate_set else None,
        })

    # ---- a generic stage loop ----------------------------------------------------------------
    def train(self, stage: str, epochs: int, optimizer: torch.optim.Optimizer, lr_cfg,
              penalty=None, delta_cfg=None, bn_frozen: bool = False) -> None:
        stage_index = self.stages.index(stage)
        model = self.model
        wrapped = model
        if self.world.distributed:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.optimizer_state is not None and self.state["epoch"] > 0:
            optimizer.load_state_dict(self.optimizer_state)
        self.optimizer_state = None
        smoothing = getattr(lr_cfg, "label_smoothing", 0.0)
        gate_set = getattr(model, "gate_set", None)
        started = time.time() - self.state["stage_seconds"].get(stage, 0.0)
        for epoch in range(self.state["epoch"], epochs):
            torch.manual_seed(_epoch_seed(self.recipe.seed, stage_index, epoch, self.world.rank))
            loader = self.loader(stage_index, epoch)
            steps = len(loader)
            if steps == 0:
                raise NasdslError(f"the training set has fewer samples than one batch ({self.recipe.batch_size})",
                                  file="batch_size")
            model.train()
            if bn_frozen:
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            loss_sum = correct = seen = 0.0
            bar = self.progress(loader, f"{stage} {epoch + 1}/{epochs}")
            for i, (x, y) in enumerate(bar):
                step = epoch * steps + i
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(lr_cfg, step, steps) * group.get("lr_scale", 1.0)
                if delta_cfg is not None:
                    gate_set.set_delta(delta_at(delta_cfg, step, steps, epochs))
                x, y = self.batch(x, y)
                logits = wrapped(x)
                loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
                total = loss + penalty() if penalty is not None else loss
                if not torch.isfinite(total):
                    raise NasdslError(f"the {stage} loss became {total.item()} at epoch {epoch + 1}; "
                                      f"lower the learning rate", file="recipe")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                loss_sum += loss.item() * y.numel()
                correct += (logits.argmax(1) == y).sum().item()
                seen += y.numel()
                if hasattr(bar, "set_postfix") and (i % 5 == 0 or i == steps - 1):
                    post = {"loss": f"{loss_sum / seen:.3f}", "acc": f"{correct / seen:.3f}"}
                    if delta_cfg is not None:
                        post["delta"] = f"{gate_set.state.delta:.3g}"
                        post["kept"] = f"{int(sum((g.s > 0).sum() for g in gate_set.gates))}/{gate_set.channels}"
                    bar.set_postfix(post)
                if delta_cfg is not None and self.world.is_main and self.histogram_due(step, steps * epochs):
                    self.record_histogram(gate_set)
            loss_sum, correct, seen = dist_utils.all_sum(self.world, loss_sum, correct, seen, device=self.device)
            val = self.evaluate(model)
            record = {"stage": stage, "epoch": epoch, "global_epoch": self.global_epoch(stage, epoch),
                      "train_loss": loss_sum / seen, "train_top1": correct / seen, "val_top1": val,
                      "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started}
            if delta_cfg is not None:
                kept = sum(int((g.s > 0).sum()) for g in gate_set.gates)
                record.update(delta=gate_set.state.delta, kept_channels=kept,
                              penalty=float(gate_set.penalty(delta_cfg.penalty).detach()))
            self.run.log(record)
            self.state["epoch"] = epoch + 1
            self.state["stage_seconds"][stage] = time.time() - started
            self.save(optimizer)
        self.state["stage_seconds"][stage] = time.time() - started

    def progress(self, loader, desc):
        if not (self.job.progress and self.world.is_main):
            return loader
        from tqdm import tqdm
        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)

    def global_epoch(self, stage: str, epoch: int) -> int:
        before = sum(self.stage_epochs(s) for s in self.stages[: self.stages.index(stage)])
        return before + epoch

    def stage_epochs(self, stage: str) -> int:
        r = self.recipe
        return {"weights": r.weights.epochs, "joint": r.weights.epochs, "architecture": r.architecture.epochs,
                "finetune": r.finetune.epochs}[stage]

    def histogram_due(self, step: int, total: int) -> bool:
        """About 12 snapshots of the gate distribution over the architecture stage."""
        every = max(1, total // 12)
        return step % every == 0 or step == total - 1

    def record_histogram(self, gate_set) -> None:
        g = torch.sigmoid(gate_set.state.delta * gate_set.flat_s().detach().cpu())
        counts = torch.histc(g, bins=10, min=0.0, max=1.0).tolist()
        self.state["histograms"].append({"delta": gate_set.state.delta, "counts": counts})

    # ---- the stages ------------------------------------------------------------------------
    def weight_params(self) -> list:
        gate_ids = {id(p) for p in self.model.gate_set.parameters()}
        return [p for p in self.model.parameters() if id(p) not in gate_ids]

    def sgd(self, groups, cfg) -> torch.optim.Optimizer:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=getattr(cfg, "nesterov", False) and cfg.momentum > 0)

    def stage_weights(self) -> None:
        """Stage 1: train the weights with every gate disabled (the identity)."""
        gate_set, cfg = self.model.gate_set, self.recipe.weights
        gate_set.set_mode("disabled")
        for p in self.model.parameters():
            p.requires_grad_(True)
        for p in gate_set.parameters():
            p.requires_grad_(False)
        optimizer = self.sgd(self.weight_params(), cfg)
        self.train("weights", cfg.epochs, optimizer, cfg)
        self.finish_stage("weights")

    def stage_architecture(self) -> None:
        """Stage 2: every weight frozen (classifier too), s from 0, delta from 1 to 1e4."""
        gate_set, cfg = self.model.gate_set, self.recipe.architecture
        if self.state["epoch"] == 0:
            gate_set.reset(0.0)
        gate_set.set_mode("soft")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in gate_set.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(gate_set.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        if self.state["epoch"] == 0 and cfg.bn == "recalibrated":
            gate_set.set_delta(cfg.delta_start)
            self.recalibrate_bn(stage_index=self.stages.index("architecture"))
        lam = cfg.lambda_a
        self.train("architecture", cfg.epochs, optimizer, cfg, penalty=lambda: lam * gate_set.penalty(cfg.penalty),
                   delta_cfg=cfg, bn_frozen=cfg.bn == "frozen")
        self.finish_stage("architecture")

    @torch.no_grad()
    def recalibrate_bn(self, stage_index: int, batches: int = 50) -> None:
        """Re-estimate BN statistics for the network as it is now (gates at 0.5 as stage 2 starts).

        With statistics frozen from stage 1, every BN after a gate would centre activations that the
        gates just halved with the wrong mean, and the error compounds over depth.
        """
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
        self.model.train()
        torch.manual_seed(_epoch_seed(self.recipe.seed, stage_index, -1, self.world.rank))
        for i, (x, _) in enumerate(self.loader(stage_index, -1)):
            if i == batches:
                break
            self.model(self.batch(x, torch.zeros(0))[0])
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
        if self.world.distributed:  # every rank keeps rank 0's statistics
            dist_utils.broadcast_(self.world, [b for m in bns for b in (m.running_mean, m.running_var)])

    def stage_joint(self) -> None:
        """The ablation's joint strategy: weights and gates trained together, delta growing."""
        gate_set, wcfg, acfg = self.model.gate_set, self.recipe.weights, self.recipe.architecture
        if self.state["epoch"] == 0:
            gate_set.reset(0.0)
        gate_set.set_mode("soft")
        for p in self.model.parameters():
            p.requires_grad_(True)
        groups = [{"params": self.weight_params()},
                  {"params": gate_set.parameters(), "weight_decay": acfg.weight_decay, "lr_scale": acfg.lr / wcfg.lr}]
        optimizer = self.sgd(groups, wcfg)
        lam = acfg.lambda_a
        self.train("joint", wcfg.epochs, optimizer, wcfg, penalty=lambda: lam * gate_set.penalty(acfg.penalty),
                   delta_cfg=acfg)
        self.finish_stage("joint")

    def finish_stage(self, stage: str) -> None:
        """After weights: the baseline. After architecture (or joint): binarise, evaluate, derive."""
        gate_set = self.model.gate_set
        results = self.state["results"]
        if stage == "weights":
            gate_set.set_mode("disabled")
            if "baseline" not in results:
                cost = network_cost(self.network)
                results["baseline"] = {"flops": cost.flops, "params": cost.params, "top1": self.evaluate(self.model)}
        else:
            # DDP keeps the gates equal; measure it before making rank 0's copy everyone's
            gate_vector = nn.utils.parameters_to_vector(gate_set.parameters())  # depth gates too
            self.state["gate_divergence"] = dist_utils.max_divergence(self.world, gate_vector)
            dist_utils.broadcast_(self.world, gate_set.parameters())
            if stage == "joint" and "baseline" not in results:
                gate_set.set_mode("disabled")
                cost = network_cost(self.network)
                results["baseline"] = {"flops": cost.flops, "params": cost.params, "top1": self.evaluate(self.model)}
            self.derive_and_evaluate()
        self.advance(stage)

    def searched_graph(self) -> Network:
        """The graph the supernet was built from: its op positions are what `slim_state_dict` reads."""
        return place_gates(self.network, self.recipe.gate_placement)

    def derive_and_evaluate(self) -> None:
        gate_set = self.model.gate_set
        self.state["depth_closed"] = self.state.get("depth_closed", 0) + gate_set.fold_depth_gates()
        s = gate_set.values()
        derivation = derive(self.searched_graph(), {k: v > 0 for k, v in s.items()}, s,
                            self.recipe.architecture.channel_multiple)
        s, stranded = settle_gates(s, derivation.masks, self.recipe.architecture.delta_end)
        gate_set.load(s)
        gate_set.set_mode("hard")
        self.derivation = derivation
        self.state["gates"] = {k: v.detach().cpu() for k, v in s.items()}
        self.state["notes"] = list(derivation.notes)
        if self.state["depth_closed"]:
            self.state["notes"].insert(0, f"{self.state['depth_closed']} block(s) closed by their depth gate "
                                          f"(architecture.block_cost)")
        if stranded:
            self.state["notes"].append(
                f"{stranded} gate(s) ended the architecture stage not yet binary at delta "
                f"{self.recipe.architecture.delta_end:g} (|s| too small); each was moved just outside that band "
                f"on its own side, so it stays kept or closed as before")
        for note in self.state["notes"]:
            self.say(f"note: {note}")
        if "searched" not in self.state["results"]:
            cost = network_cost(derivation.network)
            self.state["results"]["searched"] = {"flops": cost.flops, "params": cost.params,
                                                 "top1": self.evaluate(self.model)}
        if self.world.is_main:
            self.save_gates()

    def advance(self, stage: str) -> None:
        i = self.stages.index(stage)
        if i + 1 < len(self.stages):
            self.state["stage"], self.state["epoch"] = self.stages[i + 1], 0
            self.save(None)

    def stage_finetune(self) -> None:
        """Stage 3: the physically slim network, gates gone, every weight trained again."""
        cfg = self.recipe.finetune
        if not isinstance(self.model, NasNet) or hasattr(self.model, "gate_set"):
            if self.derivation is None:  # resumed right after the architecture stage
                self.derive_and_evaluate()
            supernet = self.model
            slim = self.place(NasNet(self.derivation.network.to_config()))
            slim.load_state_dict(slim_state_dict(self.derivation, supernet, slim))
            self.model = slim
        for p in self.model.parameters():
            p.requires_grad_(True)
        optimizer = self.sgd(list(self.model.parameters()), cfg)
        self.train("finetune", cfg.epochs, optimizer, cfg)
        cost = network_cost(self.derivation.network)
        self.state["results"]["derived"] = {"flops": cost.flops, "params": cost.params,
                                            "top1": self.evaluate(self.model)}
        if self.world.is_main:
            self.save_model()

    # ---- outputs -----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.world.is_main and self.job.progress:
            print(text, flush=True)

    def save_gates(self) -> None:
        from safetensors.torch import save

        from nasdsl.pipeline.folder import atomic_write
        tensors = {k: v.contiguous() for k, v in self.state["gates"].items()}
        atomic_write(self.job.out / "gates.safetensors", lambda f: f.write(save(tensors)))

    def save_model(self) -> None:
        from nasdsl.export.exporter import export_model
        from nasdsl.graph.printer import to_space

        network = self.derivation.network
        folder = self.job.out / "model"
        export_model(network, self.model.state_dict(), folder, _identifier(self.network.name),
                     preprocessing=self.data.preprocessing, space_text=to_space(network))

    def summary(self) -> dict:
        results = self.state["results"]
        gates = self.gate_counts()
        out = {
            "space": str(self.job.space),
            "recipe": self.recipe.to_dict(),
            "data": self.job.data,
            "baseline": results.get("baseline"),
            "searched": results.get("searched"),
            "derived": results.get("derived"),
            "gates": gates,
            "stages": {s: {"epochs": self.stage_epochs(s), "seconds": round(self.state["stage_seconds"].get(s, 0.0), 2)}
                       for s in self.stages},
            "notes": self.state.get("notes", []),
            "distributed": {"world_size": self.world.size,
                            "gate_divergence_before_sync": self.state.get("gate_divergence", 0.0)},
        }
        base, derived = results.get("baseline"), results.get("derived") or results.get("searched")
        if base and derived:
            out["reduction"] = {"flops": base["flops"] / max(derived["flops"], 1),
                                "params": base["params"] / max(derived["params"], 1)}
        return out

    def gate_counts(self) -> dict:
        gates = self.state.get("gates")
        if not gates:
            return {"total": 0, "kept": 0, "binarized_fraction": 0.0}
        s = torch.cat([t.reshape(-1) for t in gates.values()])
        g = torch.sigmoid(self.recipe.architecture.delta_end * s.double())
        binary = ((g < BINARY_TOLERANCE) | (g > 1 - BINARY_TOLERANCE)).double().mean().item() if s.numel() else 1.0
        return {"total": int(s.numel()), "kept": int((s > 0).sum()), "binarized_fraction": binary}

    def plots(self) -> None:
        from nasdsl.pipeline.plots import plot_gate_distribution, plot_kept_channels

        if self.state["histograms"]:
            plot_gate_distribution(self.state["histograms"], self.job.out / "gate_distribution.png")
        if self.derivation is not None:
            plot_kept_channels(self.network, self.derivation.masks, self.job.out / "kept_channels.png")


def settle_gates(s: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 delta_end: float) -> tuple[dict[str, torch.Tensor], int]:
    """The final gates: each s on the side of zero its effective mask says, and out of the band where
    sigmoid(delta_end * s) is not yet within BINARY_TOLERANCE of 0 or 1.

    The masks may differ from s > 0 (derivation reopens a channel or closes a cut block). A few gates
    end the search inside the band because sigmoid' vanishes there as delta grows faster than s moves;
    settling them changes no decision. Returns the new values and how many such stranded gates moved.
    """
    margin = math.log(10 / BINARY_TOLERANCE) / delta_end  # a gate within tolerance / 10
    settled, stranded = {}, 0
    for key, v in s.items():
        keep = masks[key].to(v.device)
        stranded += int(((v > 0) == keep).logical_and(v.abs() < margin).sum())
        settled[key] = torch.where(keep, v.clamp_min(margin), v.clamp_max(-margin))
    return settled, stranded


def _identifier(name: str) -> str:
    ident = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return ident if ident and not ident[0].isdigit() else f"net_{ident}"


def search(job: SearchJob) -> dict:
    return Search(job).execute()
