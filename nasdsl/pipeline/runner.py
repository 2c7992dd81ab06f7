"""A run from its plan to its summary: the stages in order, a checkpoint after every epoch, resume,
the results, the plots and the exported model. This is the one place that imports across stages.

    plan = make_plan(RunRequest(space=Path("spaces/proxyless.space")))
    summary = Pipeline(plan).execute()
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dataclasses import replace

from nasdsl.derive.budget import fit_to_budget
from nasdsl.derive.derive import Derivation, derive, slim_state_dict
from nasdsl.derive.merge import train_form
from nasdsl.errors import NasdslError
from nasdsl.graph.accounting import network_cost
from nasdsl.graph.ir import Network
from nasdsl.pipeline import budgets
from nasdsl.files import load_strict, save_tensors
from nasdsl.pipeline.folder import RunFolder, load_tensors, write_json
from nasdsl.pipeline.init import AS_COMPILED, load_init
from nasdsl.pipeline.plan import Plan
from nasdsl.pipeline.state import Measured, RunState
from nasdsl.pipeline.summary import plot_search, summarize
from nasdsl.search import dnal
from nasdsl.supernet.build import build_supernet, place_gates
from nasdsl.supernet.network import NasNet
from nasdsl.train import distributed as dist_utils
from nasdsl.train.distill import Distillation
from nasdsl.train.loop import Epochs, StageHooks, Trainer, fit, recalibrate_bn, seed_all
from nasdsl.train.precision import Precision

DONE = "done"                      # the stage after the last one
STAGE1 = "supernet_weights.safetensors"  # the weights stage's result, which every budget starts from


def sgd(groups, cfg) -> torch.optim.Optimizer:
    """The weights' optimizer (stage 1, joint, finetuning) from a recipe stage."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


class Pipeline:
    def __init__(self, plan: Plan):
        self.plan, self.recipe = plan, plan.recipe
        r = plan.recipe
        self.trainer = Trainer(plan.device, plan.world, Precision(plan.precision, plan.device.type), r.batch_size,
                               r.workers, r.seed, progress=plan.request.progress, compile=r.compile)
        self.folder = RunFolder(plan.out, plan.world.is_main)
        # the graph the supernet is built from: derivation reads its op positions (every step with a budget)
        self.graph = place_gates(plan.network, r.gate_placement)
        self.names = [s.name for s in plan.stages]
        self.state = RunState(stage=self.names[0])
        self.model: nn.Module | None = None
        self.derivation: Derivation | None = None
        self.optimizer_state: dict | None = None  # from a checkpoint, for the stage it was saved in
        # while finetuning or `nasdsl train`: maps the trained form's weights to the network's (`training_form`)
        self.to_derived = None

    # ---- the run ---------------------------------------------------------------------------
    def execute(self) -> dict:
        self.setup()
        try:
            while self.state.stage != DONE:
                {"weights": self.weights, "architecture": self.architecture, "joint": self.joint,
                 "finetune": self.finetune, "train": self.train_fixed}[self.state.stage]()
        finally:
            self.folder.close()
        summary = summarize(self.plan, self.state)
        if self.plan.world.is_main:
            write_json(self.plan.out / "summary.json", summary)
            if len(self.plan.budgets) > 1:
                budgets.plot_pareto(summary, self.plan.out / "pareto.png")
        dist_utils.shutdown(self.plan.world)
        return summary

    def setup(self) -> None:
        """Create the run folder (or restore its last checkpoint on --resume) and the supernet, with
        the --init weights on a fresh start (on resume the checkpoint's weights are newer)."""
        checkpoint = self.folder.load_checkpoint() if self.plan.request.resume else None
        if checkpoint is None:
            self.create_folder()
        seed_all(self.recipe.seed)
        self.model = self.plain() if self.plan.request.train else self.supernet()
        if checkpoint is not None:
            self.restore(checkpoint)
            self.folder.truncate_metrics(lambda record: self.state.kept(record, self.names))
        elif self.plan.init is not None:
            placement = AS_COMPILED if self.plan.request.train else self.recipe.gate_placement
            load_init(self.model, self.plan.init, self.plan.network, placement)
        if self.plan.request.train:   # (a derived .space's parallel blocks train as one)
            self.model = self.training_form(self.plan.network, self.model.state_dict())

    def plain(self) -> nn.Module:
        """`nasdsl train`'s network: the space's, without gates (as nasdsl.build makes it)."""
        return self.trainer.place(NasNet(self.plan.network.to_config()))

    def supernet(self) -> nn.Module:
        arch = self.recipe.architecture
        model = self.trainer.place(build_supernet(self.plan.network, self.recipe.gate_placement,
                                                  depth_gates=arch.block_cost > 0))
        dnal.weigh_gates(model, self.plan.network, arch)
        return model

    def create_folder(self) -> None:
        plan = self.plan
        if plan.world.is_main:
            plan.out.mkdir(parents=True, exist_ok=True)
        dist_utils.barrier(plan.world)
        self.folder.write_manifest(space=str(plan.request.space), space_hash=plan.space_hash,
                                   space_overrides=plan.overrides, recipe=self.recipe.to_dict(),
                                   seed=self.recipe.seed, data=plan.data.spec, device=str(plan.device),
                                   world_size=plan.world.size, precision=plan.precision,
                                   export_name=plan.export_name,
                                   init=plan.init.describe() if plan.init else None)

    def restore(self, checkpoint: dict) -> None:
        try:
            self.state = RunState.from_plain(checkpoint["state"])
        except (KeyError, TypeError):
            raise NasdslError("this checkpoint was written by an older nasdsl; start the run again in a new "
                              "folder", file=str(self.plan.out / "checkpoint.pt")) from None
        # the derived network's weights: written by a finetuning epoch (or after the last one); the
        # checkpoint of finetuning's epoch 0 is the architecture stage's end, the supernet's
        slim = not self.plan.request.train and (self.state.stage == DONE or
                                                self.state.stage == "finetune" and self.state.epoch > 0)
        if slim:
            self.derivation = self.derive(self.state.gates)
            self.model = self.trainer.place(NasNet(self.derivation.network.to_config()))
        load_strict(self.model, checkpoint["model"], "does not fit this run's network (written by an older nasdsl "
                    "or for another space?); start the run again in a new folder",
                    file=str(self.plan.out / "checkpoint.pt"))
        if slim:
            self.model = self.training_form(self.derivation.network, self.model.state_dict())
        gate_set = getattr(self.model, "gate_set", None)
        if gate_set is not None and checkpoint.get("gate_state"):
            gate_set.set_mode(checkpoint["gate_state"]["mode"])
            gate_set.set_delta(checkpoint["gate_state"]["delta"])
        self.optimizer_state = checkpoint.get("optimizer")

    def save(self, optimizer) -> None:
        gate_set = getattr(self.model, "gate_set", None)
        self.folder.save_checkpoint({
            "state": self.state.to_plain(),
            "model": self.model_state(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "gate_state": {"mode": gate_set.state.mode, "delta": gate_set.state.delta} if gate_set else None,
        })

    def train(self, stage: str, optimizer: torch.optim.Optimizer, lr_cfg, hooks: StageHooks | None = None,
              bn_frozen: bool = False) -> None:
        """Run (or resume) one stage's epochs with the shared loop, logging and checkpointing each."""
        if self.optimizer_state is not None and self.state.epoch > 0:
            optimizer.load_state_dict(self.optimizer_state)
        self.optimizer_state = None
        epochs = Epochs(stage, self.names.index(stage), self.plan.stage(stage).epochs, self.state.epoch,
                        self.plan.data.train, self.plan.data.val, lr_cfg, bn_frozen,
                        self.state.stage_seconds.get(stage, 0.0))
        before = sum(s.epochs for s in self.plan.stages[: self.names.index(stage)])

        if stage in ("architecture", "finetune"):
            before += self.state.budget * sum(s.epochs for s in self.plan.stages if s.name in ("architecture",
                                                                                               "finetune"))
        several = len(self.plan.budgets) > 1 and stage in ("architecture", "finetune")
        budget = {"budget": self.state.budget} if several else {}

        def end_of_epoch(epoch: int, record: dict) -> None:
            self.folder.log({"stage": stage, "epoch": epoch, "global_epoch": before + epoch, **budget, **record})
            if isinstance(hooks, dnal.BudgetHooks):
                self.state.budget_lambda = hooks.lam
            self.state.epoch = epoch + 1
            self.state.stage_seconds[stage] = record["seconds"]
            self.save(optimizer)

        self.state.stage_seconds[stage] = fit(self.trainer, self.model, optimizer, epochs, hooks or StageHooks(),
                                              end_of_epoch)

    # ---- the stages ------------------------------------------------------------------------
    def weights(self) -> None:
        cfg = self.recipe.weights
        self.train("weights", sgd(dnal.train_weights_only(self.model), cfg), cfg)
        self.model.gate_set.set_mode("disabled")
        if self.state.baseline is None:
            self.state.baseline = self.measure(self.plan.network)
        distill = self.recipe.finetune.distill
        if (len(self.plan.budgets) > 1 or distill and distill.teacher == "supernet") and self.plan.world.is_main:
            save_tensors(self.plan.out / STAGE1, self.model.state_dict())  # every budget's start; the teacher
        self.advance("weights")

    def architecture(self) -> None:
        cfg, fresh = self.recipe.architecture, self.state.epoch == 0
        params = dnal.train_gates_only(self.model, fresh)
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if fresh and cfg.bn == "recalibrated":
            self.model.gate_set.set_delta(cfg.delta_start)
            recalibrate_bn(self.trainer, self.model, self.plan.data.train, self.names.index("architecture"))
        self.train("architecture", optimizer, cfg, self.gate_hooks(cfg.epochs), bn_frozen=cfg.bn == "frozen")
        self.searched()
        self.advance("architecture")

    def joint(self) -> None:
        wcfg, acfg = self.recipe.weights, self.recipe.architecture
        if self.state.baseline is None and self.plan.init is not None:  # the imported model, before training
            self.model.gate_set.set_mode("disabled")
            self.state.baseline = self.measure(self.plan.network)
        weights, gates = dnal.train_jointly(self.model, self.state.epoch == 0)
        optimizer = sgd([{"params": weights}, {"params": gates, "weight_decay": acfg.weight_decay,
                                                    "lr_scale": acfg.lr / wcfg.lr}], wcfg)
        self.train("joint", optimizer, wcfg, self.gate_hooks(wcfg.epochs))
        if self.state.baseline is None:
            self.model.gate_set.set_mode("disabled")
            self.state.baseline = self.measure(self.plan.network)
        self.searched()
        self.advance("joint")

    def gate_hooks(self, epochs: int) -> dnal.GateHooks:
        snapshots = self.state.histograms if self.plan.world.is_main else None
        gate_set, arch = self.model.gate_set, self.recipe.architecture
        if not self.plan.budgets or self.state.stage != "architecture":
            return dnal.GateHooks(gate_set, arch, epochs, snapshots)
        budget = self.plan.budgets[self.state.budget]

        def measure(values: dict[str, torch.Tensor]) -> int:
            return budget.cost(self.derive(values).network)

        return dnal.BudgetHooks(gate_set, arch, epochs, snapshots, target=self.plan.targets[self.state.budget],
                                measure=measure, lam=self.state.budget_lambda)

    def finetune(self) -> None:
        """Stage 3: the physically slim network, gates gone, every weight trained again."""
        cfg = self.recipe.finetune
        if hasattr(self.model, "gate_set"):
            if self.derivation is None:  # resumed right after the architecture stage
                self.searched()
            with torch.device("meta"):   # only its module names: slim_state_dict files the weights by them
                slim = NasNet(self.derivation.network.to_config())
            self.model = self.training_form(self.derivation.network, slim_state_dict(self.derivation, self.model, slim))
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.train("finetune", sgd(list(self.model.parameters()), cfg), cfg, self.distillation())
        self.state.derived = self.measure(self.derivation.network)
        if self.plan.world.is_main:
            self.save_model()
        self.next_model()

    def training_form(self, network: Network, state: dict[str, torch.Tensor]) -> nn.Module:
        """`network` with these weights in the form finetuning and `nasdsl train` train it:
        merge.train_form, each layer's parallel blocks as one block of fewer, wider ops with the same
        function, batch statistics and gradients (a step of the default search's derived network
        took 1/1.5 of the time). Checkpoints and the export keep `network`'s weights (`model_state`)."""
        network, state, self.to_derived = train_form(network, state)
        model = NasNet(network.to_config())
        model.load_state_dict(state)
        return self.trainer.place(model)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's weights, the derived network's while finetuning trains its merged form."""
        state = self.model.state_dict()
        return self.to_derived(state) if self.to_derived is not None else state

    def train_fixed(self) -> None:
        """`nasdsl train`: the space's network trained as it is, with the weights stage's optimizer
        and schedule; it is the run's `derived` network (summary.json keeps a search's shape)."""
        cfg = self.recipe.weights
        self.train("train", sgd(list(self.model.parameters()), cfg), cfg)
        self.state.derived = self.measure(self.plan.network)
        if self.plan.world.is_main:
            self.save_model()
        self.state.stage = DONE

    def distillation(self) -> StageHooks | None:
        """finetune.distill's hooks: the teacher is the stage-1 network (the supernet as the weights
        stage left it, gates disabled) or the plan's checked weights file in the plain network."""
        cfg = self.recipe.finetune.distill
        if cfg is None:
            return None
        if self.plan.teacher is not None:
            teacher = self.plain()
            load_init(teacher, self.plan.teacher, self.plan.network, AS_COMPILED)
        else:
            teacher = self.supernet()
            teacher.load_state_dict(load_tensors(self.plan.out / STAGE1))
            teacher.gate_set.set_mode("disabled")
        return Distillation(teacher, cfg.weight, cfg.temperature)

    def next_model(self) -> None:
        """After a budget's finetuning: its summary entry, then the next budget from the stage-1 weights."""
        if self.plan.budgets:
            self.state.models.append(budgets.model_entry(self.plan, self.state))
        if self.state.budget + 1 >= max(1, len(self.plan.budgets)):
            self.state.stage = DONE
            return
        self.state.next_budget()
        self.say(f"budget {self.state.budget + 1} of {len(self.plan.budgets)}: {self.plan.budgets[self.state.budget]}")
        self.model, self.to_derived = self.supernet(), None
        self.model.load_state_dict(load_tensors(self.plan.out / STAGE1))
        self.derivation = None
        self.save(None)

    def advance(self, stage: str) -> None:
        i = self.names.index(stage)
        if i + 1 < len(self.names):
            self.state.stage, self.state.epoch = self.names[i + 1], 0
            self.save(None)

    # ---- search results ----------------------------------------------------------------------
    def derive(self, gates: dict[str, torch.Tensor]) -> Derivation:
        return derive(self.graph, {k: v > 0 for k, v in gates.items()}, gates,
                      self.recipe.architecture.channel_multiple)

    def searched(self) -> None:
        """After the gates are learned: make the ranks agree, settle the gates, derive, evaluate."""
        gate_set, arch = self.model.gate_set, self.recipe.architecture
        # DDP keeps the gates equal; measure it before making rank 0's copy everyone's
        vector = nn.utils.parameters_to_vector(gate_set.parameters())  # depth gates too
        self.state.gate_divergence = dist_utils.max_divergence(self.plan.world, vector)
        dist_utils.broadcast_(self.plan.world, gate_set.parameters())
        self.state.depth_closed += gate_set.fold_depth_gates()
        values = gate_set.values()
        if self.plan.budgets:
            values, derivation = self.fit_budget(values)
        else:
            derivation = self.derive(values)
        settled, stranded = dnal.settle_gates(values, derivation.masks, arch.delta_end)
        dnal.harden(gate_set, settled)
        self.derivation = derivation
        self.state.gates = {k: v.detach().cpu() for k, v in settled.items()}
        self.state.notes = list(derivation.notes)
        if self.state.depth_closed:
            self.state.notes.insert(0, f"{self.state.depth_closed} block(s) closed by their depth gate "
                                       f"(architecture.block_cost)")
        if stranded:
            self.state.notes.append(dnal.stranded_note(stranded, arch.delta_end))
        for note in self.state.notes:
            self.say(f"note: {note}")
        if self.state.searched is None:
            self.state.searched = self.measure(derivation.network)
        if self.plan.world.is_main:
            self.save_gates()

    def fit_budget(self, values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Derivation]:
        """The guarantee: close (or reopen) the channels that give least (most) per unit of cost until
        the derived network costs at most the target, and at least 90% of it."""
        budget, target = self.plan.budgets[self.state.budget], self.plan.targets[self.state.budget]
        steered = budget.cost(self.derive(values).network)
        values, derivation, closed, reopened = fit_to_budget(
            self.graph, values, budget.metric, target, self.recipe.architecture.channel_multiple, budget.layer_price)
        self.state.achieved = budget.cost(derivation.network)
        self.state.fit = {"steered": steered, "closed": closed, "reopened": reopened}
        return values, replace(derivation, notes=[*derivation.notes,
                                                  budgets.fit_note(budget, target, self.state.achieved, closed, reopened)])

    def measure(self, network: Network) -> Measured:
        cost = network_cost(network)
        return Measured(cost.flops, cost.params, self.trainer.evaluate(self.model, self.plan.data.val))

    # ---- outputs -----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.plan.world.is_main and self.plan.request.progress:
            print(text, flush=True)

    def save_gates(self) -> None:
        save_tensors(self.plan.out / budgets.gates_file(self.plan, self.state.budget), self.state.gates)

    def save_model(self) -> None:
        from nasdsl.export.exporter import export_model
        from nasdsl.graph.printer import to_space

        network = self.derivation.network if self.derivation is not None else self.plan.network
        data = self.plan.data
        export_model(network, self.model_state(), self.plan.out / budgets.model_dir(self.plan, self.state.budget),
                     self.plan.export_name, preprocessing=data.preprocessing, space_text=to_space(network))
        if self.state.histograms or self.derivation is not None:
            plot_search(self.plan, self.state, self.derivation)
